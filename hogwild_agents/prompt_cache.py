"""Reuse of an encoded prompt prefix across runs (multi-turn chats re-send the same beginning)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from hogwild_agents.cache import SHARED, RunCache, pages_for


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

    def reuse(self, prompt: Sequence[int], cache: RunCache) -> int:
        """Write the stored K/V of the longest common prefix into `cache`'s (empty) shared block and
        return its length. The last prompt token is always left to encode (its logits start the run)."""
        with self._lock:
            n = 0
            for a, b in zip(self._ids[: len(prompt) - 1], prompt[: len(prompt) - 1], strict=False):
                if a != b:
                    break
                n += 1
            if n == 0 or self._k is None:
                return 0
            k, v = self._k[:, :, :n], self._v[:, :, :n]
        cache.write_block(SHARED, 0, list(prompt[:n]), k, v)
        return n

    def store(self, prompt: Sequence[int], cache: RunCache) -> None:
        """Keep a copy of the prompt's K/V (the first len(prompt) tokens of the shared block)."""
        n = len(prompt)
        block = cache.block(SHARED)
        k, v = cache.pool.read(None, block.pages[: pages_for(n)], n)
        with self._lock:
            self._ids = list(prompt)
            self._k, self._v = k.clone(), v.clone()

    def clear(self) -> None:
        with self._lock:
            self._ids, self._k, self._v = [], None, None
