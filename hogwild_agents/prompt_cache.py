"""Reuse of an encoded prompt prefix across runs (multi-turn chats re-send the same beginning)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from hogwild_agents.cache import SHARED, SharedKVCache


class PromptCache:
    """The token ids and K/V of the last prompt a run encoded on an engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ids: list[int] = []
        self._k: torch.Tensor | None = None  # [layers, kv_heads, tokens, head_dim]
        self._v: torch.Tensor | None = None

    def common_prefix(self, prompt: Sequence[int], limit: int) -> int:
        """Length of the shared beginning of `prompt` and the stored prompt, at most `limit`."""
        with self._lock:
            n = 0
            for a, b in zip(self._ids[:limit], prompt[:limit], strict=False):
                if a != b:
                    break
                n += 1
            return n

    def copy_into(self, cache: SharedKVCache, ids: Sequence[int]) -> None:
        """Write the stored K/V of `ids` (a prefix of the stored prompt) at the start of the shared block."""
        with self._lock:
            n = len(ids)
            if list(ids) != self._ids[:n] or self._k is None:
                raise ValueError("ids are not a prefix of the stored prompt")
            cache.reserve(SHARED, 0, n)
            shared = cache.groups[SHARED]
            shared.k[:, 0, :, :n] = self._k[:, :, :n].to(shared.k)
            shared.v[:, 0, :, :n] = self._v[:, :, :n].to(shared.v)
        cache.commit(SHARED, 0, list(ids))

    def store(self, prompt: Sequence[int], cache: SharedKVCache) -> None:
        """Keep a copy of the prompt's K/V (the first len(prompt) tokens of the shared block)."""
        n = len(prompt)
        shared = cache.groups[SHARED]
        with self._lock:
            self._ids = list(prompt)
            self._k = shared.k[:, 0, :, :n].clone()
            self._v = shared.v[:, 0, :, :n].clone()

    def clear(self) -> None:
        with self._lock:
            self._ids, self._k, self._v = [], None, None
