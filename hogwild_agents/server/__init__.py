"""`hogwild serve`: an OpenAI-compatible HTTP server over ChatHogwild, and its Ray Serve deployment.

Modules: `config` (server settings), `schemas` (request validation), `convert` (a request as a
ChatHogwild call, its reply as OpenAI JSON), `streaming` (SSE chunks; disconnects cancel the run),
`app` (the FastAPI app), `ray_app` (replicas on Ray Serve). FastAPI, uvicorn and Ray are imported only
by `app` and `ray_app` (the `serve` extra: `pip install "hogwild-agents[serve]"`).
"""

from hogwild_agents.server.config import ServerConfig
from hogwild_agents.server.errors import APIError

__all__ = ["APIError", "ServerConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from hogwild_agents.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
