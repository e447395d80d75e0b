"""Loaded engines, shared by every ChatHogwild with the same (model, device, dtype, compile).

An instance that gets an engine here becomes one of its users; `release` drops the engine from the
registry once no user is left (users that were garbage-collected no longer count), so that its weights
are freed when the last reference to it goes.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

from hogwild_agents.engine import HogwildEngine

Key = tuple[str | None, str | None, str | None, bool]

_engines: dict[Key, HogwildEngine] = {}
_users: dict[Key, dict[int, weakref.ref]] = {}
_lock = threading.Lock()
_log = logging.getLogger(__name__)


def get_engine(
    model: str | None, device: str | None, dtype: str | None, compile: bool = False, *, user: Any = None
) -> HogwildEngine:
    """The engine for these settings, loaded on first use (once, even under concurrent calls); `user`
    (an object that can be weakly referenced) is recorded as one of its users."""
    key = (model, device, dtype, compile)
    with _lock:
        engine = _engines.get(key)
        if engine is None:
            _log.debug("Loading an engine: model=%r device=%r dtype=%r compile=%r", *key)
            engine = _engines[key] = HogwildEngine.from_pretrained(
                model, device=device, dtype=dtype, compile=compile
            )
        if user is not None:
            users = _users.setdefault(key, {})
            known = users.get(id(user))
            if known is None or known() is not user:  # an id may be reused after its object died
                users[id(user)] = weakref.ref(user)
        return engine


def release(
    model: str | None, device: str | None, dtype: str | None, compile: bool = False, *, user: Any
) -> bool:
    """`user` no longer uses the engine for these settings; drop the engine when nobody else does.
    Returns True when it was dropped."""
    key = (model, device, dtype, compile)
    with _lock:
        users = _users.get(key, {})
        users.pop(id(user), None)
        if any(ref() is not None for ref in users.values()) or key not in _engines:
            return False
        del _engines[key]
        _users.pop(key, None)
        return True


def loaded(
    model: str | None, device: str | None, dtype: str | None, compile: bool = False
) -> HogwildEngine | None:
    """The engine for these settings if one is loaded (nothing is loaded here)."""
    with _lock:
        return _engines.get((model, device, dtype, compile))


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
        _users.clear()
