"""Loaded engines, shared by every ChatHogwild with the same (model, device, dtype, compile)."""

from __future__ import annotations

import threading

from hogwild_agents.engine import HogwildEngine

_engines: dict[tuple[str | None, str | None, str | None, bool], HogwildEngine] = {}
_lock = threading.Lock()


def get_engine(
    model: str | None, device: str | None, dtype: str | None, compile: bool = False
) -> HogwildEngine:
    """The engine for these settings, loaded on first use (once, even under concurrent calls)."""
    key = (model, device, dtype, compile)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            engine = _engines[key] = HogwildEngine.from_pretrained(
                model, device=device, dtype=dtype, compile=compile
            )
        return engine


def register_engine(
    engine: HogwildEngine, model: str | None, device: str | None, dtype: str | None, compile: bool = False
) -> None:
    """Make `engine` the shared engine for these settings (e.g. one a test already loaded)."""
    with _lock:
        _engines[(model, device, dtype, compile)] = engine


def clear() -> None:
    """Forget every loaded engine."""
    with _lock:
        _engines.clear()
