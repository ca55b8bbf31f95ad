"""A real uvicorn server for tests: `serve`'s own settings (http_limits.server_config), in a thread."""
from __future__ import annotations

import socket
import threading
import time

import uvicorn

from chatglm_ft.http_limits import server_config


class LiveServer:
    """uvicorn with the server's limits, in a thread, on a socket bound to a free loopback port."""

    def __init__(self, app, **limits):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, log_level="warning", **limits))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
