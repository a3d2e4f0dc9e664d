"""Build the app: FastAPI with the REST router, the Gradio UI mounted at ``/``, OpenAPI docs at ``/docs``.

``create_app`` only assembles; ``serve`` binds a socket (127.0.0.1 unless told otherwise), says where, and runs
uvicorn on it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
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

    # Only the REST API is limited here; Gradio has its own limits on its routes.
    app.add_middleware(BodyLimit, limit=lambda: state.settings.max_body_bytes, prefix=PREFIX)

    @app.exception_handler(Exception)
    async def no_traceback(request: Request, exc: Exception):
        # Anything the routes did not map is a bug; answer without a traceback or local paths.
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log."}, status_code=500)

    app.include_router(router)
    if ui:
        # Gradio takes seconds to import; an app without the demo (ui=False, the REST tests) never loads it.
        import gradio as gr

        from .ui import build_ui

        blocks = build_ui(state)
        blocks.queue(default_concurrency_limit=state.settings.ui_concurrency)
        app = gr.mount_gradio_app(app, blocks, path="/", allowed_paths=[str(state.downloads_dir())])
        if state.settings.warm_start:  # the weight analysis is the slowest first call: compute it before anyone asks
            threading.Thread(target=state.warm, name="neuronscope-warm", daemon=True).start()
    return app


class BodyLimit:
    """ASGI middleware: refuse (413) a request body over ``limit()`` bytes under ``prefix``.

    A declared ``Content-Length`` over the limit is refused before any byte is read. A body without one
    (``Transfer-Encoding: chunked``) is read and counted chunk by chunk, and refused as soon as it passes the limit,
    so at most ``limit`` bytes are ever held; a body within the limit is replayed to the app unchanged. A client
    that disconnects while sending is dropped without running the route.
    """

    MAX_MESSAGES = 1_000_000  # bounds the read loop even for a client sending empty chunks

    def __init__(self, app, limit: Callable[[], int], prefix: str):
        self.app, self.limit, self.prefix = app, limit, prefix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        limit = self.limit()
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await self.refuse(limit, scope, receive, send)
        chunks, size = [], 0
        for _ in range(self.MAX_MESSAGES):
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away mid-body: nothing to answer, nothing run
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return await self.refuse(limit, scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        else:
            return await self.refuse(limit, scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as the server's own receive does

        return await self.app(scope, replay, send)

    @staticmethod
    async def refuse(limit: int, scope, receive, send):
        response = JSONResponse({"detail": f"request body too large; at most {limit} bytes."}, status_code=413)
        await response(scope, receive, send)


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


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(app: FastAPI, sock: socket.socket, log: Callable[[str], None] = print) -> None:
    """Run uvicorn on an already bound socket until interrupted."""
    import uvicorn  # the server is needed only to serve, not to build the app (tests use TestClient)

    url = address(sock)
    log(f"neuronscope-tl: serving on {url} (demo {url}/, REST {url}{PREFIX}, docs {url}/docs)")
    if not is_loopback(sock.getsockname()[0]):
        log("neuronscope-tl: warning: this address is reachable from other machines; the app has no authentication.")
    sys.stdout.flush()  # the address must reach a piped reader before uvicorn blocks
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
