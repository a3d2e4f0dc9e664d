"""The web app: the REST API (:mod:`.api`) and a Gradio demo (:mod:`.ui`) in one FastAPI process
(:mod:`.server`), over one model whose work is serialised by a lock (:mod:`.state`).

``AppSettings`` and ``AppState`` import without the web stack; ``create_app`` and the server defaults load
FastAPI and Gradio on first use (the CLI reads the settings for every command, and most commands serve nothing).
"""

from .state import AppSettings, AppState

__all__ = ["AppSettings", "AppState", "DEFAULT_HOST", "DEFAULT_PORT", "create_app"]


def __getattr__(name):
    if name in ("DEFAULT_HOST", "DEFAULT_PORT", "create_app"):
        from . import server  # optional heavy dependency: FastAPI and Gradio load only when the app is built

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
