"""The KV cache: one paged pool of K/V storage per engine, and each run's blocks in it.

A *block* is a run of tokens whose keys are stored rotated at their LOCAL index (as if the block began
at position 0). A run has three groups of blocks:

- ``SHARED``: one block, the prompt plus the shared history (finished steps, injected blocks). It only
  grows, so its keys are stored at their absolute positions and it sits at offset 0 of every view.
- ``HEADERS``: small fixed blocks (section headers) written once at the start of a run.
- ``STEPS``: one block per worker: its current step (or, in the contiguous layout, its whole output).
  A finished step moves into ``SHARED`` with one re-rotation of its keys; the block starts empty again.

Storage is paged, as in serving engines: the pool holds K as `[layers, kv_heads, pages, PAGE_SIZE, k_dim]`
and V as `[layers, kv_heads, pages, PAGE_SIZE, v_dim]` (the two head dims differ in multi-head latent
attention), and a block is a list of pages plus a length. Pages are taken from the pool when a block
grows and given back when the run releases its cache, so runs of any length share one storage with at
most one partly filled page per block. The pool grows by doubling up to its byte cap; a scheduler
reserves pages for a run before admitting it (`KVPool.reserve`), so admitted runs never exhaust it.
A pool made with `grow_on_reserve` grows when pages are reserved rather than when they are taken, so
forwards do not change its storage (a compiled decode step is compiled for one storage size).

Every K/V write goes through `KVPool.write` (new tokens of a forward, finished steps moving into the
shared history, reused prompt prefixes); attention implementations only read.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hogwild_agents.architecture import ModelAttention
from hogwild_agents.errors import CacheCapacityError

SHARED, HEADERS, STEPS = 0, 1, 2
GROUPS = (SHARED, HEADERS, STEPS)
PAGE_SIZE = 16  # tokens per page


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, attention: ModelAttention, dtype: torch.dtype, device: torch.device) -> KVShape:
        return cls(attention.n_layers, attention.kv_heads, attention.k_dim, attention.v_dim, dtype, device)

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        width = self.layers * self.kv_heads * (self.k_dim + self.v_dim)
        return width * torch.finfo(self.dtype).bits // 8


def pages_for(tokens: int) -> int:
    return -(-tokens // PAGE_SIZE)


class KVPool:
    """Paged K/V storage shared by runs of one model (`attention`: its layers' rotations and masks).
    `max_bytes` caps the storage (None: no cap)."""

    def __init__(
        self,
        shape: KVShape,
        attention: ModelAttention,
        max_bytes: int | None = None,
        *,
        grow_on_reserve: bool = False,
    ) -> None:
        self.shape = shape
        self.attention = attention
        self.rotations = attention.rotations
        self.page_bytes = shape.bytes_per_token * PAGE_SIZE
        self.max_pages = None if max_bytes is None else max_bytes // self.page_bytes
        if self.max_pages is not None and self.max_pages < 1:
            raise ValueError(
                f"max_cache_bytes={max_bytes} is smaller than one cache page ({self.page_bytes} bytes); "
                "raise it."
            )
        self.k = self._storage(0, shape.k_dim)
        self.v = self._storage(0, shape.v_dim)
        self._free: list[int] = []  # a heap: the lowest free page first, so blocks stay compact
        self._in_use = 0
        self.reserved = 0  # pages promised to admitted runs (see `reserve`)
        self._scratch: int | None = None
        self.grow_on_reserve = grow_on_reserve

    def _storage(self, pages: int, dim: int) -> torch.Tensor:
        s = self.shape
        return torch.zeros((s.layers, s.kv_heads, pages, PAGE_SIZE, dim), dtype=s.dtype, device=s.device)

    # ---- accounting ----------------------------------------------------------------------------
    @property
    def n_pages(self) -> int:
        return self.k.shape[2]

    @property
    def pages_in_use(self) -> int:
        return self._in_use

    @property
    def bytes_allocated(self) -> int:
        return self.n_pages * self.page_bytes

    def can_reserve(self, pages: int) -> bool:
        return self.max_pages is None or self.reserved + pages <= self.max_pages

    def fits_alone(self, pages: int) -> bool:
        return self.max_pages is None or pages <= self.max_pages

    def reserve(self, pages: int) -> None:
        """Promise `pages` to a run (admission control); `unreserve` when it leaves."""
        if not self.can_reserve(pages):
            raise CacheCapacityError(
                f"cannot reserve {pages} pages: {self.reserved} of {self.max_pages} taken"
            )
        self.reserved += pages
        if self.grow_on_reserve and self.reserved > self.n_pages:
            self._grow(self.reserved)

    def unreserve(self, pages: int) -> None:
        self.reserved = max(0, self.reserved - pages)
        if self._in_use == 0 and self.reserved == 0:
            self.trim()

    def scratch_page(self) -> int:
        """A page no block owns, for the padding rows of a static decode step to write into. Taken (and
        reserved) on first use and held for the pool's life, so the storage is never trimmed after."""
        if self._scratch is None:
            self.reserve(1)
            self._scratch = self.allocate(1)[0]
        return self._scratch

    # ---- pages ---------------------------------------------------------------------------------
    def allocate(self, count: int) -> list[int]:
        """Take `count` pages (growing the storage by doubling, within the cap)."""
        missing = count - len(self._free)
        if missing > 0:
            self._grow(self.n_pages + missing)
        pages = [heapq.heappop(self._free) for _ in range(count)]
        self._in_use += count
        return pages

    def release(self, pages: Sequence[int]) -> None:
        for page in pages:
            heapq.heappush(self._free, page)
        self._in_use -= len(pages)
        if self._in_use == 0 and self.reserved == 0:
            self.trim()

    def trim(self) -> None:
        """Give the storage back when no page is in use (the pool regrows on demand)."""
        if self._in_use == 0 and self.n_pages:
            self.k, self.v = self._storage(0, self.shape.k_dim), self._storage(0, self.shape.v_dim)
            self._free = []

    def _grow(self, needed: int) -> None:
        pages = max(needed, 2 * self.n_pages, 4)
        if self.max_pages is not None:
            if needed > self.max_pages:
                raise CacheCapacityError(
                    f"the KV cache is full: {needed} pages needed, the cap is {self.max_pages} pages "
                    f"({self.max_pages * self.page_bytes} bytes); raise max_cache_bytes or run fewer "
                    "or shorter runs at once."
                )
            pages = min(pages, self.max_pages)
        old = self.n_pages
        for name, dim in (("k", self.shape.k_dim), ("v", self.shape.v_dim)):
            grown = self._storage(pages, dim)
            grown[:, :, :old] = getattr(self, name)
            setattr(self, name, grown)
        for page in range(old, pages):
            heapq.heappush(self._free, page)

    def copy_pages(self, source: Sequence[int], target: Sequence[int]) -> None:
        """Copy the K/V of pages `source` into pages `target` (all layers)."""
        if source:
            src = torch.tensor(list(source), dtype=torch.long, device=self.k.device)
            dst = torch.tensor(list(target), dtype=torch.long, device=self.k.device)
            self.k[:, :, dst] = self.k[:, :, src]
            self.v[:, :, dst] = self.v[:, :, src]

    # ---- the one write path --------------------------------------------------------------------
    def write(
        self,
        layer: int | None,
        pages: torch.Tensor,
        offsets: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
    ) -> None:
        """Store K/V of tokens at (page, offset) pairs. `layer` None: all layers, `k`/`v` shaped
        [layers, kv_heads, tokens, k_dim / v_dim]; else [kv_heads, tokens, k_dim / v_dim]."""
        if layer is None:
            self.k[:, :, pages, offsets] = k.to(self.k.dtype)
            self.v[:, :, pages, offsets] = v.to(self.v.dtype)
            return
        # one index_put_ on the storage itself, not on a view of it (compiled, it then writes in place)
        heads = torch.arange(self.shape.kv_heads, device=pages.device)[:, None]  # [kv_heads, 1]
        index = (torch.full_like(heads, layer), heads, pages[None], offsets[None])  # -> [kv_heads, tokens]
        self.k.index_put_(index, k.to(self.k.dtype))
        self.v.index_put_(index, v.to(self.v.dtype))

    def read(self, layer: int | None, pages: Sequence[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the first `length` tokens held in `pages`: [(layers,) kv_heads, length, k_dim / v_dim]."""
        index = torch.tensor(list(pages), dtype=torch.long, device=self.k.device)
        k = self.k[:, :, index] if layer is None else self.k[layer][:, index]
        v = self.v[:, :, index] if layer is None else self.v[layer][:, index]
        k = k.reshape(*k.shape[:-3], -1, k.shape[-1])
        v = v.reshape(*v.shape[:-3], -1, v.shape[-1])
        return k[..., :length, :], v[..., :length, :]


@dataclass
class Block:
    """A run of tokens in the pool: its pages, how many tokens it holds, and their ids."""

    pages: list[int] = field(default_factory=list)
    length: int = 0
    token_ids: list[int] = field(default_factory=list)

    def locations(self, start: int, count: int) -> tuple[list[int], list[int]]:
        """(page, offset) of local positions start..start+count."""
        positions = range(start, start + count)
        return [self.pages[p // PAGE_SIZE] for p in positions], [p % PAGE_SIZE for p in positions]


class RunCache:
    """All K/V of one run, as blocks in a pool: the shared block, header blocks and one step block per
    worker. `release()` gives the pages back."""

    def __init__(self, pool: KVPool, n_workers: int, n_headers: int) -> None:
        self.pool = pool
        self.shape = pool.shape
        self.rotations = pool.rotations
        self.blocks: list[list[Block]] = [
            [Block()],
            [Block() for _ in range(max(n_headers, 1))],
            [Block() for _ in range(n_workers)],
        ]

    # ---- reading -------------------------------------------------------------------------------
    def block(self, group: int, slot: int = 0) -> Block:
        return self.blocks[group][slot]

    def length(self, group: int, slot: int = 0) -> int:
        return self.blocks[group][slot].length

    def token_ids(self, group: int, slot: int = 0) -> list[int]:
        return self.blocks[group][slot].token_ids

    def lengths(self, group: int) -> list[int]:
        return [b.length for b in self.blocks[group]]

    @property
    def shared_length(self) -> int:
        return self.length(SHARED)

    @property
    def tokens_stored(self) -> int:
        return sum(b.length for blocks in self.blocks for b in blocks)

    @property
    def pages_held(self) -> int:
        return sum(len(b.pages) for blocks in self.blocks for b in blocks)

    @property
    def bytes_used(self) -> int:
        """Bytes holding real tokens: tokens_stored x bytes_per_token."""
        return self.tokens_stored * self.shape.bytes_per_token

    @property
    def bytes_allocated(self) -> int:
        """Bytes of the pages this run holds (at most one partly filled page per block)."""
        return self.pages_held * self.pool.page_bytes

    def block_kv(
        self, layer: int, group: int, slot: int, length: int, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K rotated to absolute positions offset..offset+length and V: [kv_heads, length, k_dim / v_dim]."""
        block = self.blocks[group][slot]
        k, v = self.pool.read(layer, block.pages[: pages_for(length)], length)
        if group == SHARED or offset == 0:
            return k, v
        return self.rotations.shift_layer(layer, k, offset), v

    def block_kv_all(self, group: int, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K (at block-local positions) and V of a block's first `length` tokens over all layers:
        [layers, kv_heads, length, k_dim / v_dim]."""
        block = self.blocks[group][slot]
        return self.pool.read(None, block.pages[: pages_for(length)], length)

    # ---- writing -------------------------------------------------------------------------------
    def reserve(self, group: int, slot: int, n_tokens: int) -> int:
        """Make room for `n_tokens` more tokens in a block; return the local index they start at."""
        block = self.blocks[group][slot]
        missing = pages_for(block.length + n_tokens) - len(block.pages)
        if missing > 0:
            block.pages.extend(self.pool.allocate(missing))
        return block.length

    def commit(self, group: int, slot: int, token_ids: Sequence[int]) -> None:
        """Record that `token_ids` were written at the end of a block (their K/V already stored)."""
        block = self.blocks[group][slot]
        block.length += len(token_ids)
        block.token_ids.extend(token_ids)

    def write_block(
        self, group: int, slot: int, token_ids: Sequence[int], k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Append tokens whose K/V (all layers, [layers, kv_heads, n, k_dim / v_dim], keys at the block's
        local positions) were computed elsewhere."""
        start = self.reserve(group, slot, len(token_ids))
        pages, offsets = self.blocks[group][slot].locations(start, len(token_ids))
        device = self.pool.k.device
        self.pool.write(None, torch.tensor(pages, device=device), torch.tensor(offsets, device=device), k, v)
        self.commit(group, slot, token_ids)

    def move_to_shared(self, slot: int) -> None:
        """Append a finished step block to the shared block (one re-rotation), then empty the step block."""
        step = self.blocks[STEPS][slot]
        if step.length == 0:
            return
        k, v = self.pool.read(None, step.pages, step.length)  # [layers, kv_heads, length, k_dim]
        k = self.rotations.shift_all(k, self.shared_length)  # each layer by its own rotation
        self.write_block(SHARED, 0, step.token_ids, k, v)
        self.pool.release(step.pages)
        self.blocks[STEPS][slot] = Block()

    def fork(self) -> RunCache:
        """A copy of every block in new pages of the same pool: writing to one leaves the other as it is."""
        twin = RunCache(self.pool, len(self.blocks[STEPS]), len(self.blocks[HEADERS]))
        for group, blocks in enumerate(self.blocks):
            for slot, block in enumerate(blocks):
                pages = self.pool.allocate(len(block.pages))
                self.pool.copy_pages(block.pages, pages)
                twin.blocks[group][slot] = Block(pages, block.length, list(block.token_ids))
        return twin

    def release(self) -> None:
        """Give every page back to the pool; the cache is empty afterwards."""
        pages = [p for blocks in self.blocks for b in blocks for p in b.pages]
        for blocks in self.blocks:
            for i in range(len(blocks)):
                blocks[i] = Block()
        if pages:
            self.pool.release(pages)
