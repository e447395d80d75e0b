"""The static decode step: a forward where every row feeds ONE token, with tensors of fixed shapes.

The common tick of the engine is a decode step: every worker of every active run feeds its newest token.
This module runs it with shapes that depend only on a *bucket*: the number of rows R, of query slots per
tile S (the most rows reading one block), and of long and short tiles. Everything the attention needs is
packed by the host into one integer tensor (`DecodeTables`); masks, rotations and write locations are
computed from it ON the device, and nothing inside the forward reads a tensor value back to the host
(no `.item()`, `.tolist()` or Python branching on values). So `torch.compile(fullgraph=True)` takes the
whole forward, model and attention, as one graph per bucket, and on CUDA that graph is captured once
per bucket and replayed (CUDA graphs: one launch per step instead of thousands).

The attention reads each block once (cascade attention, as the fast path): every block of the forward
is cut into *tiles*, LONG_TILE pages each while at least that many remain and single pages after, so no
tile holds keys of another block or padding beyond the block's last page. A tile carries the block's
readers as query slots, each with its own view offset of the block (the query is rotated by -offset:
the RoPE trick), the block keys it sees and its view position. One batched matmul per tile class
attends every tile's slots to its keys; each row's partials are merged by log-sum-exp. Tile counts are
padded to multiples of TILE_STEP / PAGE_STEP (not powers of two), with padding tiles that see nothing.
Padding rows feed token 0 at position 0 into a *scratch page* the pool holds for this purpose (no
block owns it); their logits are dropped.

Multi-token forwards (prompt chunks, forced text, headers) keep the eager path (`attention.py`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hogwild_agents.block_attention import (
    LayerProps,
    partial_attention,
    rotated_queries,
    scatter_merge,
    visible_keys,
)
from hogwild_agents.cache import PAGE_SIZE, KVPool, pages_for
from hogwild_agents.plan import ForwardPlan
from hogwild_agents.rotary import RotarySpec

MIN_ROWS = 1  # smallest row bucket
LONG_TILE = 16  # pages per long tile (256 tokens)
TILE_STEP = 4  # long tiles are padded to a multiple of this (64 pages)
PAGE_STEP = 16  # short tiles (single pages) are padded to a multiple of this
RECOMPILE_LIMIT = 256  # compiled graphs kept for the step (dynamo's default, 8, would run eagerly after)
_ROW_FIELDS = 5  # input id, position, write page, write offset, offset of the written block
_SLOT_FIELDS = 4  # per slot of a tile: row, partial's row (R for padding), block offset, keys seen


def bucket(count: int, minimum: int = 1) -> int:
    """The power of two at or above `count` (and `minimum`)."""
    return max(minimum, 1 << max(count - 1, 0).bit_length())


def round_up(count: int, step: int) -> int:
    return -(-count // step) * step


@dataclass(frozen=True)
class TileShape:
    """The shape of one forward's tables: its bucket."""

    rows: int  # R
    slots: int  # S
    long_tiles: int
    short_tiles: int


def tile_fields(pages: int, slots: int) -> int:
    """int64 fields per tile: its pages, its first key's index in its block, 4 per slot."""
    return pages + 1 + _SLOT_FIELDS * slots


@dataclass(frozen=True)
class DecodeTables:
    """One decode forward's inputs as int64 host tensors: `rows` [5, R] (input ids, positions, write
    pages, write offsets, written block offsets) and per tile class [tiles, fields] (`tile_fields`): its
    pages, its first key's index in its block, and per slot (row, row of its partial, block offset, keys
    seen)."""

    rows: torch.Tensor
    long: torch.Tensor
    short: torch.Tensor
    real_rows: int  # R - real_rows rows are padding
    shape: TileShape
    pages_read: int  # pool pages the tiles read (padding tiles excluded)

    def to(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(t.to(device, non_blocking=True) for t in (self.rows, self.long, self.short))


def tiles_of(plan: ForwardPlan) -> list[tuple[list[int], int, list[tuple[int, int, int]]]]:
    """The forward's tiles: (pages, first key index in the block, [(row, block offset, keys seen)])."""
    row_of_token = {plan.row_starts[n]: n for n in range(len(plan.rows))}
    tiles = []
    for read in plan.reads:
        slots = [(row_of_token[q.token], q.offset, q.limit) for q in read.queries]
        n_pages = pages_for(read.width)
        first = 0
        while first < n_pages:
            size = LONG_TILE if n_pages - first >= LONG_TILE else 1
            tiles.append((read.pages[first : first + size], first * PAGE_SIZE, slots))
            first += size
    return tiles


def decode_tables(plan: ForwardPlan, scratch_page: int, min_rows: int = MIN_ROWS) -> DecodeTables:
    """Pack a decode plan's rows and tiles into fixed-shape tables (host lists -> one tensor)."""
    if not plan.single_tokens:
        raise ValueError("the static decode step takes forwards whose rows each feed one token")
    n_rows = len(plan.rows)
    tiles = tiles_of(plan)
    long = [t for t in tiles if len(t[0]) == LONG_TILE]
    short = [t for t in tiles if len(t[0]) != LONG_TILE]
    shape = TileShape(
        rows=bucket(n_rows, min_rows),
        slots=bucket(max(len(t[2]) for t in tiles)),
        long_tiles=round_up(len(long), TILE_STEP),
        short_tiles=round_up(len(short), PAGE_STEP),
    )
    ids, positions, write_pages, write_offsets, write_block = [], [], [], [], []
    for row in plan.rows:
        target = row.target
        block = row.cache.block(target.group, target.slot)
        ids.append(row.token_ids[0])
        positions.append(row.first_position)
        write_pages.append(block.pages[target.visible // PAGE_SIZE])
        write_offsets.append(target.visible % PAGE_SIZE)
        write_block.append(target.offset)
    padding = shape.rows - n_rows  # a padding row writes its key at the scratch page's first slot
    row_table = [
        ids + [0] * padding,
        positions + [0] * padding,
        write_pages + [scratch_page] * padding,
        write_offsets + [0] * padding,
        write_block + [0] * padding,
    ]
    tables = []
    for group, count, size in ((long, shape.long_tiles, LONG_TILE), (short, shape.short_tiles, 1)):
        table = [[*pages, key_start, *_slot_fields(slots, shape)] for pages, key_start, slots in group]
        table += [[scratch_page] * size + [0] + _slot_fields([], shape)] * (count - len(group))
        tables.append(torch.tensor(table, dtype=torch.long).view(count, tile_fields(size, shape.slots)))
    pages_read = sum(len(t[0]) for t in tiles)
    return DecodeTables(torch.tensor(row_table, dtype=torch.long), *tables, n_rows, shape, pages_read)


def _slot_fields(slots: list[tuple[int, int, int]], shape: TileShape) -> list[int]:
    pad = shape.slots - len(slots)
    rows = [s[0] for s in slots] + [0] * pad
    partial_rows = [s[0] for s in slots] + [shape.rows] * pad
    offsets = [s[1] for s in slots] + [0] * pad
    limits = [s[2] for s in slots] + [0] * pad
    return rows + partial_rows + offsets + limits


@dataclass
class TileClass:
    """One class of tiles as device tensors (views of the packed table)."""

    pages: torch.Tensor  # [tiles, pages per tile]
    key_start: torch.Tensor  # [tiles]
    row: torch.Tensor  # [tiles, S]
    partial_row: torch.Tensor  # [tiles, S]
    offset: torch.Tensor  # [tiles, S]
    limit: torch.Tensor  # [tiles, S]
    position: torch.Tensor  # [tiles, S] view position of each slot's query

    @property
    def width(self) -> int:
        return self.pages.shape[1] * PAGE_SIZE


class StaticPlan:
    """What the attention of every layer reads in a static decode step, built once per forward from the
    tables, on the device (inside the compiled graph). It offers `store_new_kv` the same fields as a
    `ForwardPlan` (pool, write locations, the written blocks' offsets)."""

    def __init__(
        self, pool: KVPool, rows: torch.Tensor, long: torch.Tensor, short: torch.Tensor, slots: int
    ) -> None:
        self.pool = pool
        self.attention = pool.attention
        self.rotations = pool.rotations
        self.derived: dict[Any, Any] = {}
        self.n_rows = rows.shape[1]
        self.input_ids = rows[0][None]  # [1, R]
        self.position_ids = rows[1][None]  # [1, R]
        self.write_pages = rows[2]  # [R]
        self.write_offsets = rows[3]  # [R]
        self.write_block_offsets = rows[4]  # [R]
        self.classes: list[TileClass] = []
        for table, size in ((long, LONG_TILE), (short, 1)):
            slot = table[:, size + 1 :].view(table.shape[0], _SLOT_FIELDS, slots)
            self.classes.append(
                TileClass(
                    pages=table[:, :size],
                    key_start=table[:, size],
                    row=slot[:, 0],
                    partial_row=slot[:, 1],
                    offset=slot[:, 2],
                    limit=slot[:, 3],
                    position=rows[1][slot[:, 0]],
                )
            )

    def rotation(self, index: int, rotary: RotarySpec) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [tiles, S, rot] of -offset for tile class `index` (once per forward and rotation)."""
        key = ("rotate", index, rotary.key)
        if key not in self.derived:
            self.derived[key] = rotary.cos_sin(-self.classes[index].offset, torch.float32)
        return self.derived[key]

    def visibility(self, index: int, props: LayerProps) -> torch.Tensor:
        key = ("seen", index, props.window, props.chunk)
        if key not in self.derived:
            c = self.classes[index]
            self.derived[key] = visible_keys(c.key_start, c.width, c.limit, c.offset, c.position, props)
        return self.derived[key]


def static_attention(plan: StaticPlan, layer: int, query: torch.Tensor, props: LayerProps) -> torch.Tensor:
    """Attention of one token per row over its paged view, each block read once.
    query: [1, heads, R, q_dim] -> [1, R, heads, v_dim]."""
    storage_k, storage_v = plan.pool.k[layer], plan.pool.v[layer]  # [kv_heads, pages, PAGE, dim]
    kv_heads = storage_k.shape[0]
    tops, totals, accs, rows = [], [], [], []
    for index, tiles in enumerate(plan.classes):
        count = tiles.pages.shape[0]
        if count == 0:
            continue
        keys = storage_k[:, tiles.pages].reshape(kv_heads, count, tiles.width, -1)
        values = storage_v[:, tiles.pages].reshape(kv_heads, count, tiles.width, -1)
        rotation = None if props.rotary is None else plan.rotation(index, props.rotary)
        q = rotated_queries(query[0], tiles.row, rotation, props, kv_heads)
        top, total, acc = partial_attention(q, keys, values, plan.visibility(index, props), props)
        tops.append(top.flatten(1, 2))
        totals.append(total.flatten(1, 2))
        accs.append(acc.flatten(1, 2))
        rows.append(tiles.partial_row.reshape(-1))
    out = scatter_merge(
        torch.cat(tops, dim=1),
        torch.cat(totals, dim=1),
        torch.cat(accs, dim=1),
        torch.cat(rows),
        plan.n_rows,
        props,
    )
    return out.to(query.dtype)[None]


def _decode_forward(
    model: nn.Module,
    no_mask: torch.Tensor,
    pool: KVPool,
    rows: torch.Tensor,
    long: torch.Tensor,
    short: torch.Tensor,
    slots: int,
) -> torch.Tensor:
    """The whole decode forward: tables -> logits [1, R, vocab]. Traced as one graph when compiled."""
    plan = StaticPlan(pool, rows, long, short, slots)
    out = model(
        input_ids=plan.input_ids,
        position_ids=plan.position_ids,
        attention_mask=no_mask,  # a 4D mask is used as given: no mask is built
        use_cache=False,
        hogwild_plan=plan,
        hogwild_attend=static_attention,
    )
    return out.logits


class StaticDecodeStep:
    """Runs decode forwards through the static step. `compile=True` compiles it with
    `torch.compile(fullgraph=True)`: one graph per (tile shape, pool storage size); on CUDA each graph is
    also captured as a CUDA graph on first use and replayed after."""

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool = False,
        backend: str | Callable = "inductor",
        min_rows: int = MIN_ROWS,
    ) -> None:
        self.model = model
        self.compiled = compile
        self.min_rows = min_rows
        self._no_mask = torch.zeros(1, 1, 1, 1, device=model.device)
        # tile counts are dynamic dims of the graph (one compilation serves every count; see `_args`)
        self._forward = (
            torch.compile(_decode_forward, fullgraph=True, backend=backend) if compile else _decode_forward
        )
        self.buckets_used: set[tuple[TileShape, int]] = set()  # (tile shape, pool storage pages) per forward
        self.pages_read = 0  # pool pages the tiles of every forward so far read (padding excluded)
        self._graphs: weakref.WeakKeyDictionary[KVPool, dict[TileShape, _Captured]] = (
            weakref.WeakKeyDictionary()
        )
        self._graph_pool = None  # one CUDA memory pool shared by the captured graphs

    def __call__(self, plan: ForwardPlan) -> torch.Tensor:
        """Logits [rows, vocab] (fp32) of a decode plan's rows."""
        pool = plan.pool
        tables = decode_tables(plan, pool.scratch_page(), self.min_rows)
        self.buckets_used.add((tables.shape, pool.n_pages))
        self.pages_read += tables.pages_read
        with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            if self.compiled and pool.k.is_cuda:
                logits = self._replay(pool, tables)
            else:
                logits = self._forward(*self._args(pool, tables.to(pool.k.device), tables.shape))
        # a copy: a CUDA graph writes its next logits into the same static output
        return logits[0, : tables.real_rows].to(torch.float32, copy=True)

    def _args(self, pool: KVPool, tensors: tuple[torch.Tensor, ...], shape: TileShape) -> tuple:
        rows, long, short = tensors
        if self.compiled:  # the number of tiles varies from forward to forward: keep it symbolic
            torch._dynamo.maybe_mark_dynamic(long, 0)
            torch._dynamo.maybe_mark_dynamic(short, 0)
        return (self.model, self._no_mask, pool, rows, long, short, shape.slots)

    # ---- CUDA graphs -----------------------------------------------------------------------------
    def _replay(self, pool: KVPool, tables: DecodeTables) -> torch.Tensor:
        """Replay the graph captured for this bucket over this pool's storage (capturing it first)."""
        graphs = self._graphs.setdefault(pool, {})
        if any(c.k is not pool.k or c.v is not pool.v for c in graphs.values()):
            graphs.clear()  # the storage grew: graphs captured over the old one are stale
        captured = graphs.get(tables.shape)
        if captured is None:
            captured = graphs[tables.shape] = self._capture(pool, tables)
        for static, new in zip(captured.tables, (tables.rows, tables.long, tables.short), strict=True):
            static.copy_(new, non_blocking=True)
        captured.graph.replay()
        return captured.logits

    def _capture(self, pool: KVPool, tables: DecodeTables) -> _Captured:
        tensors = tables.to(pool.k.device)
        args = self._args(pool, tensors, tables.shape)
        # the step is idempotent (it writes the same keys and values again), so warm-up runs are harmless
        side = torch.cuda.Stream(pool.k.device)
        side.wait_stream(torch.cuda.current_stream(pool.k.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles on the first run
                self._forward(*args)
        torch.cuda.current_stream(pool.k.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (callers waiting on events) do not break the capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits = self._forward(*args)
        return _Captured(graph, tensors, logits, pool.k, pool.v)


@dataclass
class _Captured:
    """A decode step captured as a CUDA graph: it reads `tables` and writes `logits` (all static)."""

    graph: torch.cuda.CUDAGraph
    tables: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    k: torch.Tensor  # the pool storage it was captured over
    v: torch.Tensor
