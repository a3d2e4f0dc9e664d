"""A live app on 127.0.0.1 for the app tests: uvicorn in a background thread on a free port."""

from __future__ import annotations

import threading
import time

import uvicorn

from neuronscope_tl.app.server import address, bind, create_app


class LiveServer:
    """``with LiveServer(model) as srv:`` serves ``create_app(model)`` at ``srv.url`` until the block ends."""

    def __init__(self, model, settings=None):
        self.app = create_app(model, settings)
        self.state = self.app.state.neuronscope
        self.sock = bind("127.0.0.1", 0)
        self.url = address(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
