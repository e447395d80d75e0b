"""Reuse of encoded token prefixes across runs: multi-turn chats and agent loops re-send the same start.

`PromptCache` keeps the K/V of several token sequences (recent prompts, and the prompt plus the reply
of single-worker raw runs, whose K/V equal those of the plain sequence), evicting the least recently
used beyond a byte bound. A new run copies the K/V of the longest prefix any entry shares with its
prompt into its shared block and encodes only the rest.

Lookup is by page-chain hashes, as in serving engines' prefix caches: the hash of every full page of
PAGE tokens chained with the pages before it maps to an entry, so the longest shared run of full pages
is found in one pass over the prompt; the match then extends token by token, and is verified.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hogwild_agents.cache import SHARED, RunCache

PAGE = 16  # tokens per hashed page
DEFAULT_MAX_BYTES = 256 * 2**20


@dataclass
class _Entry:
    ids: list[int]
    k: torch.Tensor  # [layers, kv_heads, tokens, head_dim]
    v: torch.Tensor
    keys: list[int]  # its page-chain hashes

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def _chain(ids: Sequence[int]) -> list[int]:
    """Hash of each full page of `ids`, chained with the pages before it."""
    hashes, h = [], 0
    for start in range(0, len(ids) - PAGE + 1, PAGE):
        h = hash((h, tuple(ids[start : start + PAGE])))
        hashes.append(h)
    return hashes


class PromptCache:
    """K/V of recent token sequences, at most `max_bytes` (least recently used evicted first)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"prefix cache bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id -> entry, oldest first
        self._pages: dict[int, int] = {}  # page-chain hash -> entry id
        self._next_id = 0
        self.lookups = 0  # counters, for inspection and benchmarks
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def _match(self, prompt: Sequence[int], limit: int) -> tuple[_Entry | None, int]:
        best: tuple[int, int] | None = None  # (entry id, full pages matched)
        for pages, h in enumerate(_chain(prompt[:limit]), start=1):
            entry_id = self._pages.get(h)
            if entry_id is None:
                break
            best = (entry_id, pages)
        candidates = [best[0]] if best is not None else list(self._entries)[-4:]  # short prompts
        found, length = None, 0
        for entry_id in candidates:
            entry = self._entries[entry_id]
            start = best[1] * PAGE if best is not None else 0
            if entry.ids[:start] != list(prompt[:start]):
                continue  # a hash collision
            n = start
            end = min(limit, len(entry.ids))
            while n < end and entry.ids[n] == prompt[n]:
                n += 1
            if n > length:
                found, length = entry, n
        return found, length

    def common_prefix(self, prompt: Sequence[int], limit: int) -> int:
        """Length of the longest beginning of `prompt` some entry holds, at most `limit` (a use of that
        entry: it becomes the most recently used)."""
        with self._lock:
            entry, n = self._match(prompt, limit)
            if entry is not None and n:
                self._entries.move_to_end(self._id_of(entry))
            return n

    def reuse(self, prompt: Sequence[int], cache: RunCache) -> int:
        """Write the K/V of the longest cached prefix into `cache`'s (empty) shared block and return its
        length. The last prompt token is always left to encode (its logits start the run)."""
        with self._lock:
            self.lookups += 1
            entry, n = self._match(prompt, len(prompt) - 1)
            if entry is None or n == 0:
                return 0
            self._entries.move_to_end(self._id_of(entry))
            k, v = entry.k[:, :, :n], entry.v[:, :, :n]
            self.reused_tokens += n
        cache.write_block(SHARED, 0, list(prompt[:n]), k, v)
        return n

    def _id_of(self, entry: _Entry) -> int:
        return next(i for i, e in self._entries.items() if e is entry)

    def store(self, prompt: Sequence[int], cache: RunCache) -> None:
        """Keep the K/V of `prompt` (the first len(prompt) tokens of the run's shared block)."""
        n = len(prompt)
        k, v = cache.block_kv_all(SHARED, 0, n)
        self.store_kv(prompt, k, v)

    def store_kv(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep `ids` with their K/V ([layers, kv_heads, len(ids), head_dim], keys at absolute positions)."""
        ids = list(ids)
        entry = _Entry(ids, k.clone(), v.clone(), _chain(ids))
        if entry.nbytes > self.max_bytes:
            return
        with self._lock:
            for entry_id, old in list(self._entries.items()):
                if old.ids[: len(ids)] == ids:  # already covered by a longer (or equal) entry
                    self._entries.move_to_end(entry_id)
                    return
                if ids[: len(old.ids)] == old.ids:  # the new entry covers an old one
                    self._drop(entry_id)
            entry_id, self._next_id = self._next_id, self._next_id + 1
            self._entries[entry_id] = entry
            for h in entry.keys:
                self._pages[h] = entry_id
            total = sum(e.nbytes for e in self._entries.values())
            while total > self.max_bytes and len(self._entries) > 1:
                oldest = next(iter(self._entries))
                total -= self._entries[oldest].nbytes
                self._drop(oldest)

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        for h in entry.keys:
            if self._pages.get(h) == entry_id:
                del self._pages[h]
        # a page chain of the dropped entry may also be a prefix of a kept one: re-point it
        for other_id, other in self._entries.items():
            for h in other.keys:
                self._pages.setdefault(h, other_id)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._pages.clear()
