"""One forward pass, planned: the rows of one run or of many, and the block reads their attention makes.

Each row is one writer (a worker, or a run's prompt/header/injected text): tokens written at the end of
the last block of its view. The rows of every run in the forward are packed into one sequence
`[1, tokens]` (no padding), so a prompt chunk of one run and the single decode tokens of others go
through the model's weights together.

Attention reads each block ONCE per forward (cascade attention): a `BlockRead` is one block with every
query token that sees it, each with its own view offset of that block (the query is rotated by -offset,
the RoPE trick), the number of the block's keys it sees (causality inside the block a row writes) and
its view position (sliding windows and chunks). Every attention path attends the reads and merges each
token's partial results by log-sum-exp (`block_attention.py`); the fast path groups the reads into
`ReadBatch`es of similar shape, each one batched matmul over keys gathered once (or read in place when
its pages are consecutive). Everything is built from plain Python lists once per forward and shared by
all layers, so its cost does not grow with the context length.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from hogwild_agents.cache import PAGE_SIZE, KVPool, RunCache, pages_for
from hogwild_agents.views import Segment

SCORES_PER_BATCH = 1 << 23  # scores (slots x heads x keys) one read of a batch may hold before it is chunked
SMALL_READ_PAGES = 8  # reads of at most this many pages share one batch, padded to the widest


@dataclass(frozen=True)
class RowPlan:
    """A row of one forward: tokens written at the end of the view's last segment, in `cache`'s blocks."""

    token_ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    cache: RunCache

    @property
    def target(self) -> Segment:
        return self.segments[-1]

    @property
    def first_position(self) -> int:
        """View position of the row's first new token."""
        return self.target.offset + self.target.visible

    @property
    def view_length(self) -> int:
        return sum(s.visible for s in self.segments) + len(self.token_ids)


@dataclass(frozen=True)
class QueryRead:
    """One query token's read of one block."""

    token: int  # packed index of the query token in the forward
    offset: int  # the block's offset in the token's view (the query is rotated by -offset)
    limit: int  # keys of the block the token sees: local index < limit (its own causality included)
    position: int  # the token's view position


@dataclass
class BlockRead:
    """A block attended in this forward: the pool pages of its first `width` keys, and its queries."""

    pages: list[int]
    width: int
    queries: list[QueryRead]


@dataclass
class ReadBatch:
    """Reads attended in one batched call: `reads` x `width` keys, each read by up to `slots` queries
    (padding slots have limit 0 and see nothing). Keys come from `page_table`, or when its pages are
    consecutive, straight from the pool storage from `first_page` on (no copy)."""

    reads: int
    slots: int
    width: int  # keys per read (a multiple of PAGE_SIZE)
    page_table: torch.Tensor  # [reads, width / PAGE_SIZE]
    first_page: int | None
    key_start: torch.Tensor  # [reads] local index of each read's first key in its block
    token: torch.Tensor  # [reads, slots] packed query token of each slot (0 for padding)
    offset: torch.Tensor  # [reads, slots]
    limit: torch.Tensor  # [reads, slots] (0 for padding)
    position: torch.Tensor  # [reads, slots]
    rotated: bool  # some slot has a non-zero offset (else the queries need no rotation)
    partial_token: list[int]  # packed token of each (read, slot) partial, -1 for padding


class ForwardPlan:
    """Tensors for one forward pass over a KV pool."""

    def __init__(self, rows: list[RowPlan], pool: KVPool) -> None:
        if not rows or any(not r.token_ids for r in rows):
            raise ValueError("every row of a forward must feed at least one token")
        self.rows = rows
        self.pool = pool
        self.attention = pool.attention
        self.rotations = pool.rotations
        self.derived: dict[Any, Any] = {}  # tables an attention builds on the first layer, reused by the rest
        device = pool.shape.device
        self.device = device
        self.row_starts = [0]
        for row in rows:
            self.row_starts.append(self.row_starts[-1] + len(row.token_ids))
        self.n_tokens = self.row_starts[-1]

        ids, positions, pages, offsets, unrotate = [], [], [], [], []
        for row in rows:
            n, first = len(row.token_ids), row.first_position
            ids.extend(row.token_ids)
            positions.extend(range(first, first + n))
            block = row.cache.block(row.target.group, row.target.slot)
            row_pages, row_offsets = block.locations(row.target.visible, n)
            pages.extend(row_pages)
            offsets.extend(row_offsets)
            unrotate.extend([-row.target.offset] * n)
        self._lists = (ids, positions, pages, offsets, unrotate)
        self.reads = self._block_reads()

    def _block_reads(self) -> list[BlockRead]:
        """Every block some row sees, once, with all the query tokens that see it."""
        reads: dict[tuple[int, int, int], BlockRead] = {}
        for n, row in enumerate(self.rows):
            first_token = self.row_starts[n]
            new = len(row.token_ids)
            for seg in row.segments:
                target = seg is row.target
                key = (id(row.cache), seg.group, seg.slot)
                read = reads.get(key)
                if read is None:
                    read = reads[key] = BlockRead([], 0, [])
                for t in range(new):
                    limit = seg.visible + (t + 1 if target else 0)
                    if limit:
                        read.queries.append(
                            QueryRead(first_token + t, seg.offset, limit, row.first_position + t)
                        )
                if read.queries:
                    read.width = max(read.width, max(q.limit for q in read.queries))
                    block = row.cache.block(seg.group, seg.slot)
                    read.pages = block.pages[: pages_for(read.width)]
        return [read for read in reads.values() if read.queries]

    # the tensors are built on first use: a static decode step (static_step.py) packs its own
    @cached_property
    def input_ids(self) -> torch.Tensor:  # [1, tokens]
        return torch.tensor([self._lists[0]], dtype=torch.long, device=self.device)

    @cached_property
    def position_ids(self) -> torch.Tensor:  # [1, tokens]
        return torch.tensor([self._lists[1]], dtype=torch.long, device=self.device)

    @cached_property
    def last_index(self) -> torch.Tensor:  # [rows] packed index of each row's last token
        return torch.tensor([s - 1 for s in self.row_starts[1:]], device=self.device)

    @cached_property
    def write_pages(self) -> torch.Tensor:  # [tokens]
        return torch.tensor(self._lists[2], dtype=torch.long, device=self.device)

    @cached_property
    def write_offsets(self) -> torch.Tensor:  # [tokens]
        return torch.tensor(self._lists[3], dtype=torch.long, device=self.device)

    @cached_property
    def write_block_offsets(self) -> torch.Tensor | None:
        """View offset of the block each new token is written into ([tokens]; None: every offset is 0).
        New keys arrive rotated at view positions; blocks store them at local positions."""
        unrotate = self._lists[4]
        if not any(unrotate):
            return None
        return -torch.tensor(unrotate, device=self.device)

    @property
    def single_tokens(self) -> bool:
        """Every row feeds exactly one token (a decode forward)."""
        return self.n_tokens == len(self.rows)

    @property
    def view_lengths(self) -> list[int]:
        return [row.view_length for row in self.rows]

    def row_tokens(self, row: int) -> range:
        """Packed token indices of row `row`."""
        return range(self.row_starts[row], self.row_starts[row + 1])

    # ---- the fast path's batches ---------------------------------------------------------------------
    @cached_property
    def batches(self) -> list[ReadBatch]:
        """The reads grouped for batched attention: small reads together (padded to the widest), larger
        ones by slot count and power-of-two width; a read too large for one call is cut into chunks."""
        heads = max(1, self.attention.layers[0].heads)
        pieces: list[tuple[BlockRead, int, int]] = []  # (read, first key, keys)
        for read in self.reads:
            chunk = max(PAGE_SIZE, SCORES_PER_BATCH // (heads * len(read.queries)) // PAGE_SIZE * PAGE_SIZE)
            for start in range(0, read.width, chunk):
                pieces.append((read, start, min(chunk, read.width - start)))
        groups: dict[tuple[int, int], list[tuple[BlockRead, int, int]]] = {}
        for piece in pieces:
            read, _, keys = piece
            pages = pages_for(keys)
            width_class = 0 if pages <= SMALL_READ_PAGES else (pages - 1).bit_length()
            slot_class = (len(read.queries) - 1).bit_length()
            groups.setdefault((width_class, slot_class), []).append(piece)
        return [self._read_batch(group) for _, group in sorted(groups.items())]

    def _read_batch(self, pieces: list[tuple[BlockRead, int, int]]) -> ReadBatch:
        width_pages = max(pages_for(keys) for _, _, keys in pieces)
        slots = max(len(read.queries) for read, _, _ in pieces)
        table, key_start, token, offset, limit, position, partial_token = [], [], [], [], [], [], []
        for read, start, _ in pieces:
            first = start // PAGE_SIZE
            own = read.pages[first : first + width_pages]
            table.append(own + self._padding_pages(own, width_pages - len(own)))
            key_start.append(start)
            pad = slots - len(read.queries)
            token.append([q.token for q in read.queries] + [0] * pad)
            offset.append([q.offset for q in read.queries] + [0] * pad)
            limit.append([q.limit for q in read.queries] + [0] * pad)
            position.append([q.position for q in read.queries] + [0] * pad)
            partial_token += [q.token for q in read.queries] + [-1] * pad
        flat = [page for row in table for page in row]
        consecutive = flat == list(range(flat[0], flat[0] + len(flat))) and flat[-1] < self.pool.n_pages
        device = self.device

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return ReadBatch(
            reads=len(pieces),
            slots=slots,
            width=width_pages * PAGE_SIZE,
            page_table=tensor(table),
            first_page=flat[0] if consecutive else None,
            key_start=tensor(key_start),
            token=tensor(token),
            offset=tensor(offset),
            limit=tensor(limit),
            position=tensor(position),
            rotated=any(any(row) for row in offset),
            partial_token=partial_token,
        )

    def _padding_pages(self, pages: list[int], count: int) -> list[int]:
        """Pages to pad a read with (their keys are masked): the pages that follow in the storage when
        there are any, so that a consecutive read stays consecutive; else page 0."""
        if not count:
            return []
        nxt = pages[-1] + 1 if pages else 0
        if nxt + count <= self.pool.n_pages:
            return list(range(nxt, nxt + count))
        return [0] * count

    @cached_property
    def merge_table(self) -> torch.Tensor:
        """[tokens, most partials of a token] index of each token's partials among all the batches'
        (read, slot) partials, padded with the index one past the last (an empty partial)."""
        per_token: list[list[int]] = [[] for _ in range(self.n_tokens)]
        index = 0
        for batch in self.batches:
            for token in batch.partial_token:
                if token >= 0:
                    per_token[token].append(index)
                index += 1
        width = max(len(p) for p in per_token)
        return torch.tensor(
            [p + [index] * (width - len(p)) for p in per_token], dtype=torch.long, device=self.device
        )

    def read_pages(self) -> tuple[int, int]:
        """(pages the fast path's batches gather or read, distinct pages of all rows' views): the first
        is what the attention reads, the second the physical floor of reading each block once."""
        read = sum(b.reads * b.width // PAGE_SIZE for b in self.batches)
        unique = set()
        for row in self.rows:
            for seg in row.segments:
                length = seg.visible + (len(row.token_ids) if seg is row.target else 0)
                block = row.cache.block(seg.group, seg.slot)
                unique.update((id(row.cache), p) for p in block.pages[: pages_for(length)])
        return read, len(unique)
