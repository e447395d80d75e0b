"""Scale-out on Ray Serve: replicas of the OpenAI server, one engine each, behind Ray Serve's HTTP proxy.

Each replica loads its own engine and serves the same routes as `hogwild serve` (a FastAPI ingress);
the proxy spreads requests over the replicas. On a cluster with GPUs each replica takes one GPU.

    hogwild serve MODEL --ray --replicas 2                       # a local Ray, or RAY_ADDRESS's
    serve run hogwild_agents.server.ray_app:build_app model=MODEL replicas=2
    serve deploy config.yaml    # import_path: hogwild_agents.server.ray_app:build_app, args: {...}

`build_app(args)` takes `AppArgs`' fields (strings from `serve run` are converted).
"""

from __future__ import annotations

from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve import Application

from hogwild_agents.server.config import ServerConfig

APP_NAME = "hogwild"


class AppArgs(BaseModel):
    """Arguments of `build_app`: where the model comes from, the replicas, and the server's settings
    (`ServerConfig`'s fields; left out: its defaults). `serve run` passes them as strings (`key=value`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None
    """Model directory, id or .gguf file, the same on every node (None: the embedded SmolLM2-135M)."""
    device: str | None = None
    dtype: str | None = None
    replicas: int = Field(default=1, ge=1)
    num_gpus: float | None = Field(default=None, ge=0)
    """GPUs per replica (None: 1 when the cluster, or this machine, has GPUs; else 0)."""
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Requests one replica takes at once (they share its engine's forwards)."""
    model_name: str | None = None
    n_workers: int | None = None
    protocol: str | None = None
    """A shipped protocol, a template path on every node, or "none" (raw workers)."""
    layout: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens_limit: int | None = None
    max_request_bytes: int | None = None
    timeout_s: float | None = None
    api_key: str | None = None

    def server_config(self) -> ServerConfig:
        fields = set(ServerConfig.__dataclass_fields__)
        settings = {k: v for k, v in self.model_dump(include=fields).items() if v is not None}
        if settings.get("protocol") == "none":
            settings["protocol"] = None
        if self.model is not None:
            settings.setdefault("model_name", self.model)
        return ServerConfig(**settings)


@serve.ingress()
class HogwildReplica:
    """One replica: its own engine, and the OpenAI app over it."""

    def __init__(
        self, model: str | None, device: str | None, dtype: str | None, config: ServerConfig
    ) -> None:
        from hogwild_agents.engine import HogwildEngine
        from hogwild_agents.server.app import create_app

        engine = HogwildEngine.from_pretrained(model, device=device, dtype=dtype)
        self._app = create_app(engine, config)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def gpus_per_replica() -> float:
    """1 when the Ray cluster we are connected to (or, before connecting, this machine) has GPUs."""
    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    import torch

    return 1.0 if torch.cuda.is_available() else 0.0


def build_app(args: dict[str, Any] | AppArgs) -> Application:
    """The Ray Serve application (an entry point for `serve run` / `serve deploy` config files)."""
    parsed = args if isinstance(args, AppArgs) else AppArgs.model_validate(args)
    config = parsed.server_config()  # a clear error here, before any replica starts
    num_gpus = gpus_per_replica() if parsed.num_gpus is None else parsed.num_gpus
    deployment = serve.deployment(HogwildReplica, name="HogwildServer").options(
        num_replicas=parsed.replicas,
        max_ongoing_requests=parsed.max_ongoing_requests,
        ray_actor_options={"num_cpus": 1, "num_gpus": num_gpus},
    )
    return deployment.bind(parsed.model, parsed.device, parsed.dtype, config)


def run(args: AppArgs, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """Start Ray (or join the cluster at `address`), serve the app on host:port, and block until Ctrl-C."""
    if not ray.is_initialized():
        ray.init(address=address)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=True)
