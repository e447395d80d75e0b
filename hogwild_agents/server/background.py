"""Serving an app from a background thread (tests, benchmarks, notebooks): uvicorn on a free port."""

from __future__ import annotations

import threading
import time
from typing import Any


class BackgroundServer:
    """`with BackgroundServer(app) as server:` serves `app` with uvicorn on `host` (port 0: a free one)
    in a daemon thread; `server.url` is its base URL. Leaving the block stops it."""

    def __init__(
        self, app: Any, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0
    ) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="hogwild-serve", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
