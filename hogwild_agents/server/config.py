"""Server settings: the defaults a request's omitted fields take, and the limits it must stay within."""

from __future__ import annotations

from dataclasses import dataclass

from hogwild_agents.engine import MAX_WORKERS
from hogwild_agents.protocol import Protocol
from hogwild_agents.views import LAYOUTS

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ServerConfig:
    """`model_name`: the id clients send as `model` (and /v1/models lists). `n_workers`, `protocol`
    (a shipped name, a template path, or None for raw workers), `layout`, `max_tokens` (per worker),
    `temperature`, `top_p`: defaults for requests that omit them. `max_tokens_limit`: the largest
    `max_tokens` a request may ask for; `max_request_bytes`: the largest request body; `timeout_s`: the
    wall-clock limit of one request's run (then its workers stop, finish reason "length"); `api_key`:
    when set, /v1 routes need `Authorization: Bearer <api_key>`."""

    model_name: str = DEFAULT_MODEL_NAME
    n_workers: int = 2
    protocol: str | None = "collaborate"
    layout: str = "combined"
    max_tokens: int = 256
    temperature: float = 0.6
    top_p: float = 1.0
    max_tokens_limit: int = 4096
    max_request_bytes: int = 1_000_000
    timeout_s: float | None = None
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if not 1 <= self.n_workers <= MAX_WORKERS:
            raise ValueError(f"n_workers must be between 1 and {MAX_WORKERS}, got {self.n_workers}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        if not 1 <= self.max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"max_tokens must be between 1 and max_tokens_limit ({self.max_tokens_limit}), "
                f"got {self.max_tokens}"
            )
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_request_bytes < 1024:
            raise ValueError(f"max_request_bytes must be >= 1024, got {self.max_request_bytes}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.protocol is not None:
            Protocol(self.protocol)  # a clear error now for an unknown name or a broken template
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it out to serve without a key)")
