"""The web app: the seed's REST API (:mod:`.api`) and a Gradio demo (:mod:`.ui`) in one FastAPI process
(:mod:`.server`), over one model whose work is serialised by a lock (:mod:`.state`)."""

from .server import DEFAULT_HOST, DEFAULT_PORT, create_app
from .state import AppSettings, AppState

__all__ = ["AppSettings", "AppState", "DEFAULT_HOST", "DEFAULT_PORT", "create_app"]
