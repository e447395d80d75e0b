"""The static decode step: a forward where every row feeds ONE token, with tensors of fixed shapes.

The common tick of the engine is a decode step: every worker of every active run feeds its newest token.
This module runs it with shapes that depend only on two *buckets* (powers of two): the number of rows,
padded to R, and each row's view as a page table padded to P pages. Everything the attention needs is
packed by the host into one integer tensor (`DecodeTables`); masks, rotations and write locations are
computed from it ON the device, and nothing inside the forward reads a tensor value back to the host
(no `.item()`, `.tolist()` or Python branching on values). So `torch.compile(fullgraph=True)` takes the
whole forward, model and attention, as one graph per bucket, and on CUDA that graph is captured once
per bucket and replayed (CUDA graphs: one launch per step instead of thousands).

Per row r and view page p (a page of a block in the row's view, in any order):
- `page_table[r, p]`: the pool page; `page_offset[r, p]`: the view offset of the page's block (the
  query is rotated by -offset for that page, the RoPE trick: stored keys are never rotated);
  `page_visible[r, p]`: how many of the page's keys the row sees (its block's visible length, plus the
  row's own new token on the page it writes; 0 for padding pages).
- The attention gathers the row's pages, scores them against the per-page rotated query, runs ONE
  softmax over all of them, and sums the values with those weights.
Padding rows feed token 0 at position 0 into a *scratch page* the pool holds for this purpose (no
block owns it) and attend to that page only; their logits are dropped.

Multi-token forwards (prompt chunks, forced text, headers) keep the eager path (`attention.py`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hogwild_agents.cache import PAGE_SIZE, KVPool, pages_for
from hogwild_agents.plan import MASKED, ForwardPlan

MIN_ROWS = 1  # smallest row bucket
MIN_PAGES = 8  # smallest page bucket (128 tokens of view)
RECOMPILE_LIMIT = 256  # compiled graphs kept for the step (dynamo's default, 8, would run eagerly after)
_ROW_FIELDS = 5  # input id, position, write page, write offset, offset of the written block


def bucket(count: int, minimum: int = 1) -> int:
    """The power of two at or above `count` (and `minimum`)."""
    return max(minimum, 1 << max(count - 1, 0).bit_length())


@dataclass(frozen=True)
class DecodeTables:
    """One decode forward's inputs, packed into one int64 host tensor `ints` of 5R + 3RP entries:
    [input ids, positions, write pages, write offsets, written block offsets] (each [R]), then
    [page table, page offsets, page visible counts] (each [R, P])."""

    ints: torch.Tensor
    rows: int  # real rows (R - rows are padding)
    row_bucket: int  # R
    page_bucket: int  # P


def view_pages(plan: ForwardPlan) -> list[int]:
    """Pages of each row's view, the row's own new token included."""
    return [
        sum(pages_for(s.visible + (1 if s is row.target else 0)) for s in row.segments) for row in plan.rows
    ]


def decode_tables(
    plan: ForwardPlan, scratch_page: int, min_rows: int = MIN_ROWS, min_pages: int = MIN_PAGES
) -> DecodeTables:
    """Pack a decode plan's rows into fixed-shape tables (host lists -> one tensor on the device)."""
    if not plan.single_tokens:
        raise ValueError("the static decode step takes forwards whose rows each feed one token")
    n_rows = len(plan.rows)
    rows = bucket(n_rows, min_rows)
    pages = bucket(max(view_pages(plan)), min_pages)
    ids, positions, write_pages, write_offsets, write_block = [], [], [], [], []
    table, offsets, visible = [], [], []
    for row in plan.rows:
        target = row.target
        block = row.cache.block(target.group, target.slot)
        ids.append(row.token_ids[0])
        positions.append(row.first_position)
        write_pages.append(block.pages[target.visible // PAGE_SIZE])
        write_offsets.append(target.visible % PAGE_SIZE)
        write_block.append(target.offset)
        used = 0
        for seg in row.segments:
            length = seg.visible + (1 if seg is target else 0)
            count = pages_for(length)
            if count == 0:
                continue
            table += row.cache.block(seg.group, seg.slot).pages[:count]
            offsets += [seg.offset] * count
            visible += [PAGE_SIZE] * (count - 1) + [length - PAGE_SIZE * (count - 1)]
            used += count
        table += [scratch_page] * (pages - used)
        offsets += [0] * (pages - used)
        visible += [0] * (pages - used)
    padding = rows - n_rows
    # a padding row writes its key at the scratch page's first slot and sees only that key
    ids += [0] * padding
    positions += [0] * padding
    write_pages += [scratch_page] * padding
    write_offsets += [0] * padding
    write_block += [0] * padding
    table += [scratch_page] * (pages * padding)
    offsets += [0] * (pages * padding)
    visible += ([1] + [0] * (pages - 1)) * padding
    flat = ids + positions + write_pages + write_offsets + write_block + table + offsets + visible
    return DecodeTables(torch.tensor(flat, dtype=torch.long), n_rows, rows, pages)


class StaticPlan:
    """What the attention of every layer reads in a static decode step, built once per forward from the
    tables, on the device (inside the compiled graph). It offers `store_new_kv` the same fields as a
    `ForwardPlan` (pool, write locations, un-rotation of the new keys)."""

    def __init__(self, pool: KVPool, ints: torch.Tensor, rows: int, pages: int) -> None:
        self.pool = pool
        self.rotations = pool.rotations
        per_row = ints[: _ROW_FIELDS * rows].view(_ROW_FIELDS, rows)
        per_page = ints[_ROW_FIELDS * rows :].view(3, rows, pages)
        self.input_ids = per_row[0][None]  # [1, R]
        self.position_ids = per_row[1][None]  # [1, R]
        self.write_pages = per_row[2]  # [R]
        self.write_offsets = per_row[3]  # [R]
        # new keys arrive rotated at view positions; blocks store them at local positions
        self.unrotate_cos, self.unrotate_sin = self.rotations.cos_sin(-per_row[4], torch.float32)  # [R, rot]
        self.page_table = per_page[0]  # [R, P]
        self.cos, self.sin = self.rotations.cos_sin(-per_page[1], torch.float32)  # [R, P, rot]
        slots = torch.arange(PAGE_SIZE, device=ints.device)
        self.visible = slots < per_page[2][..., None]  # [R, P, PAGE]


def static_attention(plan: StaticPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one token per row over its paged view. query: [1, heads, R, dim] -> [1, R, heads, dim]."""
    _, heads, rows, dim = query.shape
    storage_k, storage_v = plan.pool.k[layer], plan.pool.v[layer]  # [kv_heads, pages, PAGE, dim]
    kv_heads = storage_k.shape[0]
    per_kv = heads // kv_heads
    pages = plan.page_table.shape[1]
    q = (query[0] * scaling).view(kv_heads, per_kv, rows, dim).transpose(1, 2)  # [kv_heads, R, per_kv, dim]
    cos = plan.cos[None, :, :, None]  # [1, R, P, 1, rot]
    sin = plan.sin[None, :, :, None]
    # the query rotated by -offset of each page's block: [kv_heads, R, P, per_kv, dim]
    q_rot = plan.rotations.rotate(q.float()[:, :, None], cos, sin).to(q.dtype)
    keys = storage_k[:, plan.page_table]  # [kv_heads, R, P, PAGE, dim]
    scores = torch.matmul(q_rot, keys.transpose(-1, -2)).float()  # [kv_heads, R, P, per_kv, PAGE]
    scores = scores.masked_fill(~plan.visible[None, :, :, None], MASKED)
    scores = scores.transpose(2, 3).reshape(kv_heads, rows, per_kv, pages * PAGE_SIZE)
    weights = torch.softmax(scores, dim=-1).to(query.dtype)  # one softmax over the whole view
    values = storage_v[:, plan.page_table].reshape(kv_heads, rows, pages * PAGE_SIZE, dim)
    out = torch.matmul(weights, values)  # [kv_heads, R, per_kv, dim]
    return out.permute(1, 0, 2, 3).reshape(1, rows, heads, dim)


def _decode_forward(
    model: nn.Module, no_mask: torch.Tensor, pool: KVPool, ints: torch.Tensor, rows: int, pages: int
) -> torch.Tensor:
    """The whole decode forward: tables -> logits [1, R, vocab]. Traced as one graph when compiled."""
    plan = StaticPlan(pool, ints, rows, pages)
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
    `torch.compile(fullgraph=True)`: one graph per (row bucket, page bucket, pool storage size); on CUDA
    each graph is also captured as a CUDA graph on first use and replayed after."""

    def __init__(
        self,
        model: nn.Module,
        *,
        compile: bool = False,
        backend: str | Callable = "inductor",
        min_rows: int = MIN_ROWS,
        min_pages: int = MIN_PAGES,
    ) -> None:
        self.model = model
        self.compiled = compile
        self.min_rows = min_rows
        self.min_pages = min_pages
        self._no_mask = torch.zeros(1, 1, 1, 1, device=model.device)
        self._forward = (
            torch.compile(_decode_forward, fullgraph=True, dynamic=False, backend=backend)
            if compile
            else _decode_forward
        )
        self.buckets_used: set[tuple[int, int, int]] = set()  # (R, P, pool storage pages) of each forward
        self._graphs: weakref.WeakKeyDictionary[KVPool, dict[tuple[int, int], _Captured]] = (
            weakref.WeakKeyDictionary()
        )
        self._graph_pool = None  # one CUDA memory pool shared by the captured graphs

    def __call__(self, plan: ForwardPlan) -> torch.Tensor:
        """Logits [rows, vocab] (fp32) of a decode plan's rows."""
        pool = plan.pool
        tables = decode_tables(plan, pool.scratch_page(), self.min_rows, self.min_pages)
        self.buckets_used.add((tables.row_bucket, tables.page_bucket, pool.n_pages))
        # each bucket is a recompilation of the same function: let dynamo keep them all
        with torch.inference_mode(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            if self.compiled and pool.k.is_cuda:
                logits = self._replay(pool, tables)
            else:
                ints = tables.ints.to(pool.k.device, non_blocking=True)
                logits = self._forward(
                    self.model, self._no_mask, pool, ints, tables.row_bucket, tables.page_bucket
                )
        # a copy: a CUDA graph writes its next logits into the same static output
        return logits[0, : tables.rows].to(torch.float32, copy=True)

    # ---- CUDA graphs -----------------------------------------------------------------------------
    def _replay(self, pool: KVPool, tables: DecodeTables) -> torch.Tensor:
        """Replay the graph captured for this bucket over this pool's storage (capturing it first)."""
        graphs = self._graphs.setdefault(pool, {})
        if any(c.k is not pool.k or c.v is not pool.v for c in graphs.values()):
            graphs.clear()  # the storage grew: graphs captured over the old one are stale
        key = (tables.row_bucket, tables.page_bucket)
        captured = graphs.get(key)
        if captured is None:
            captured = graphs[key] = self._capture(pool, tables)
        captured.ints.copy_(tables.ints, non_blocking=True)
        captured.graph.replay()
        return captured.logits

    def _capture(self, pool: KVPool, tables: DecodeTables) -> _Captured:
        ints = tables.ints.to(pool.k.device)
        args = (self.model, self._no_mask, pool, ints, tables.row_bucket, tables.page_bucket)
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
        return _Captured(graph, ints, logits, pool.k, pool.v)


@dataclass
class _Captured:
    """A decode step captured as a CUDA graph: it reads `ints` and writes `logits` (both static)."""

    graph: torch.cuda.CUDAGraph
    ints: torch.Tensor
    logits: torch.Tensor
    k: torch.Tensor  # the pool storage it was captured over
    v: torch.Tensor
