"""Build the app: FastAPI with the REST router, the Gradio UI mounted at ``/``, OpenAPI docs at ``/docs``.

``create_app`` only assembles; ``serve`` binds a socket (127.0.0.1 unless told otherwise), says where, and runs
uvicorn on it.
"""

from __future__ import annotations

import socket
import sys
from typing import Callable, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from .api import PREFIX, router
from .state import AppSettings, AppState

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def create_app(model, settings: Optional[AppSettings] = None, ui: bool = True) -> FastAPI:
    """The FastAPI app over ``model``: REST routes under /api/pruning and (with ``ui``) the Gradio demo at /."""
    state = AppState(model, settings)
    app = FastAPI(
        title="neuronscope_tl",
        description=f"Find prunable MLP neurons of {state.model_name} and prove it by measurement. "
        "The Gradio demo is at /; model work is serialised by one lock.",
        version="0.1.0",
    )
    app.state.neuronscope = state

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        # Only the REST API is limited here; Gradio has its own limits on its routes.
        if request.url.path.startswith(PREFIX):
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > state.settings.max_body_bytes):
                return JSONResponse(
                    {"detail": f"request body too large; at most {state.settings.max_body_bytes} bytes."}, status_code=413
                )
        return await call_next(request)

    @app.exception_handler(Exception)
    async def no_traceback(request: Request, exc: Exception):
        # Anything the routes did not map is a bug; answer without a traceback or local paths.
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log."}, status_code=500)

    app.include_router(router)
    if ui:
        import gradio as gr

        from .ui import build_ui

        blocks = build_ui(state)
        blocks.queue(default_concurrency_limit=state.settings.ui_concurrency)
        app = gr.mount_gradio_app(app, blocks, path="/", allowed_paths=[str(state.downloads_dir())])
    return app


def bind(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {exc.strerror or exc}.") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app: FastAPI, sock: socket.socket, log: Callable[[str], None] = print) -> None:
    """Run uvicorn on an already bound socket until interrupted."""
    import uvicorn

    url = address(sock)
    log(f"neuronscope-tl: serving on {url} (demo {url}/, REST {url}{PREFIX}, docs {url}/docs)")
    sys.stdout.flush()  # the address must reach a piped reader before uvicorn blocks
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
