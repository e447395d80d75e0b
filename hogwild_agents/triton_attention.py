"""Block attention over the shared cache as a Triton kernel: each block read once (split-K cascade).

The kernel attends the plan's `BlockRead`s (plan.py): every block of the forward with the stacked queries
of all the rows that see it. A read is cut into *items* of at most `chunk_length` keys, so a long shared
block spreads over many programs (flash-decoding's split-K); one program per (item, kv head) reads its
keys ONCE, in place from the paged pool through the block's page table, and scores them against all its
stacked queries (slots x query heads per kv head) with an online softmax, honouring each slot's own limit
(causality in the block it writes) and the layer's window or chunk and soft-cap. It writes a partial
result per query (max, sum of exponentials, unnormalised output), and `block_attention.merge_partials`
merges each query's partials by log-sum-exp, with the layer's attention sinks, exactly as the fast path
does. The queries are scaled and rotated by -offset of the block per slot on the host side of the kernel
(`block_attention.rotated_queries`, the RoPE trick), whatever the layer's rotation (partial, interleaved,
decoupled): the kernel only sees dot products.

Runs on CUDA; with `TRITON_INTERPRET=1` set before this module is imported, Triton's interpreter runs
the same kernel on the CPU (slowly), which is how the tests check it against the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hogwild_agents.block_attention import LayerProps, merge_partials, rotated_queries
from hogwild_agents.cache import PAGE_SIZE, pages_for
from hogwild_agents.plan import ForwardPlan

MIN_CHUNK = 256  # keys per item at the least
SPLITS = 16  # the longest read is cut into about this many items, so that long blocks spread over programs
MAX_QUERIES = 128  # stacked queries (slots x heads per kv head) per read the kernel takes
BLOCK_N = 32  # keys per tile inside a program
ITEM_FIELDS = 5  # int32 per item: first slot, slots, page table start, first key, end key
NO_BOUND = -(1 << 30)  # lower key bound of a slot with no window or chunk


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _read_partials(
    q_ptr,  # [kv_heads, all slots * PER_KV, K_DIM]: scaled, rotated queries, lane = slot * PER_KV + head
    k_ptr,  # [kv_heads, pages, PAGE, K_DIM] of one layer of the pool
    v_ptr,  # [kv_heads, pages, PAGE, V_DIM]
    pages_ptr,  # [entries] int32: the page tables of every read, concatenated
    items_ptr,  # [items, ITEM_FIELDS] int32
    limit_ptr,  # [all slots] int32: keys of the block the slot sees (local index < limit)
    low_ptr,  # [all slots] int32: first local key the slot sees (window / chunk)
    m_ptr,  # [items, kv_heads, BLOCK_Q] fp32 partial max
    l_ptr,  # [items, kv_heads, BLOCK_Q] fp32 partial sum of exponentials
    acc_ptr,  # [items, kv_heads, BLOCK_Q, BLOCK_DV] fp32 partial output
    stride_qh,
    stride_qt,
    stride_kh,
    stride_kp,
    stride_kt,
    stride_vh,
    stride_vp,
    stride_vt,
    kv_heads,
    softcap,
    PAGE: tl.constexpr,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ITEM_FIELDS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    meta = items_ptr + item * ITEM_FIELDS
    first_slot = tl.load(meta)
    slots = tl.load(meta + 1)
    table = tl.load(meta + 2)
    start = tl.load(meta + 3)
    end = tl.load(meta + 4)

    j = tl.arange(0, BLOCK_Q)  # stacked query lane: slot * PER_KV + head in group
    q_valid = j < slots * PER_KV
    slot = first_slot + j // PER_KV
    limit = tl.load(limit_ptr + slot, mask=q_valid, other=0)
    low = tl.load(low_ptr + slot, mask=q_valid, other=0)
    dk = tl.arange(0, BLOCK_DK)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + kv_head * stride_qh + (first_slot * PER_KV + j)[:, None] * stride_qt + dk[None, :],
        mask=q_valid[:, None] & (dk < K_DIM)[None, :],
        other=0.0,
    )

    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_DV), tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_valid = n < end
        page = tl.load(pages_ptr + table + n // PAGE, mask=n_valid, other=0)
        in_page = n % PAGE
        k = tl.load(
            k_base + page[:, None] * stride_kp + in_page[:, None] * stride_kt + dk[None, :],
            mask=n_valid[:, None] & (dk < K_DIM)[None, :],
            other=0.0,
        )
        s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION)  # [BLOCK_Q, BLOCK_N] fp32
        if SOFTCAP:
            s = _tanh(s / softcap) * softcap
        seen = n_valid[None, :] & (n[None, :] < limit[:, None]) & (n[None, :] >= low[:, None])
        s = tl.where(seen & q_valid[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(
            v_base + page[:, None] * stride_vp + in_page[:, None] * stride_vt + dv[None, :],
            mask=n_valid[:, None] & (dv < V_DIM)[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = item * kv_heads + kv_head
    tl.store(m_ptr + out * BLOCK_Q + j, m_i)
    tl.store(l_ptr + out * BLOCK_Q + j, l_i)
    tl.store(acc_ptr + (out * BLOCK_Q + j[:, None]) * BLOCK_DV + dv[None, :], acc)


@dataclass
class ReadTable:
    """The forward's reads as kernel items, built once per forward and shared by all layers.

    Slots are the plan's (read, query) pairs, read by read; `slot_lanes` is the most slots of one read,
    so a read's partials sit at item * slot_lanes + slot in the merged view of the kernel's output."""

    items: torch.Tensor  # [items, ITEM_FIELDS] int32
    pages: torch.Tensor  # [entries] int32
    token: torch.Tensor  # [1, all slots] packed query token of each slot
    offset: torch.Tensor  # [1, all slots] the read block's offset in the slot's view
    limit: torch.Tensor  # [all slots] int32
    position: torch.Tensor  # [all slots] the slot's view position
    merge_table: torch.Tensor  # [tokens, M] partial indices of each token (padded past the last)
    slot_lanes: int
    rotated: bool
    pages_read: int  # pool pages the items read, each once

    @property
    def n_items(self) -> int:
        return self.items.shape[0]

    @classmethod
    def from_plan(cls, plan: ForwardPlan) -> ReadTable:
        chunk = chunk_length(plan)
        slot_lanes = max(len(read.queries) for read in plan.reads)
        items, pages, token, offset, limit, position = [], [], [], [], [], []
        per_token: list[list[int]] = [[] for _ in range(plan.n_tokens)]
        pages_read = 0
        for read in plan.reads:
            first_slot, table = len(token), len(pages)
            pages += read.pages
            for query in read.queries:
                token.append(query.token)
                offset.append(query.offset)
                limit.append(query.limit)
                position.append(query.position)
            for start in range(0, read.width, chunk):
                end = min(read.width, start + chunk)
                pages_read += pages_for(end) - start // PAGE_SIZE
                for s, query in enumerate(read.queries):
                    per_token[query.token].append(len(items) * slot_lanes + s)
                items.append([first_slot, len(read.queries), table, start, end])
        width = max(len(p) for p in per_token)
        empty = len(items) * slot_lanes
        device = plan.device

        def tensor(values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            items=tensor(items, torch.int32),
            pages=tensor(pages or [0], torch.int32),
            token=tensor([token]),
            offset=tensor([offset]),
            limit=tensor(limit, torch.int32),
            position=tensor(position),
            merge_table=tensor([p + [empty] * (width - len(p)) for p in per_token]),
            slot_lanes=slot_lanes,
            rotated=any(offset),
            pages_read=pages_read,
        )

    def low_bounds(self, props: LayerProps) -> torch.Tensor:
        """[all slots] int32 first local key each slot sees under the layer's window or chunk."""
        low = torch.full_like(self.limit, NO_BOUND)
        offset = self.offset[0]
        if props.window is not None:  # view position offset + local > position - window
            low = torch.maximum(low, (self.position - offset - props.window + 1).to(torch.int32))
        if props.chunk is not None:
            start = torch.div(self.position, props.chunk, rounding_mode="floor") * props.chunk - offset
            low = torch.maximum(low, start.to(torch.int32))
        return low


def chunk_length(plan: ForwardPlan) -> int:
    """Keys per item (a multiple of the page size): long enough that the partial results stay small next
    to the keys they summarise, short enough that the longest read is split over about SPLITS programs."""
    longest = max(read.width for read in plan.reads)
    return pages_for(max(MIN_CHUNK, -(-longest // SPLITS))) * PAGE_SIZE


def fits(plan: ForwardPlan, query: torch.Tensor) -> bool:
    """True when the kernel takes this forward: at most MAX_QUERIES stacked queries per read."""
    per_kv = query.shape[1] // plan.pool.shape.kv_heads
    return per_kv * max(len(read.queries) for read in plan.reads) <= MAX_QUERIES


def read_table(plan: ForwardPlan) -> ReadTable:
    """The plan's read table (built on the first layer, reused by the others)."""
    table = plan.derived.get("triton")
    if table is None:
        table = plan.derived["triton"] = ReadTable.from_plan(plan)
    return table


def triton_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, props: LayerProps) -> torch.Tensor:
    """Block attention by the Triton kernel. query: [1, heads, tokens, k_dim] -> [1, tokens, heads, v_dim]."""
    _, heads, _, k_dim = query.shape
    kv_heads, v_dim = plan.pool.shape.kv_heads, plan.pool.shape.v_dim
    per_kv = heads // kv_heads
    table = read_table(plan)
    rotation = None
    if props.rotary is not None and table.rotated:
        key = ("triton-rotate", props.rotary.key)
        if key not in plan.derived:
            plan.derived[key] = props.rotary.cos_sin(-table.offset, torch.float32)
        rotation = plan.derived[key]
    q = rotated_queries(query[0], table.token, rotation, props, kv_heads)[:, 0].contiguous()
    key = ("triton-low", props.window, props.chunk)
    if key not in plan.derived:
        plan.derived[key] = table.low_bounds(props)
    low = plan.derived[key]

    lanes = table.slot_lanes * per_kv
    block_q = max(16, triton.next_power_of_2(lanes))
    block_dv = max(16, triton.next_power_of_2(v_dim))
    device = query.device
    m = torch.empty(table.n_items, kv_heads, block_q, dtype=torch.float32, device=device)
    total = torch.empty_like(m)
    acc = torch.empty(table.n_items, kv_heads, block_q, block_dv, dtype=torch.float32, device=device)
    k, v = plan.pool.k[layer], plan.pool.v[layer]  # [kv_heads, pages, PAGE, dim]
    _read_partials[(table.n_items, kv_heads)](
        q,
        k,
        v,
        table.pages,
        table.items,
        table.limit,
        low,
        m,
        total,
        acc,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        kv_heads,
        float(props.softcap or 1.0),
        PAGE=PAGE_SIZE,
        K_DIM=k_dim,
        V_DIM=v_dim,
        PER_KV=per_kv,
        BLOCK_Q=block_q,
        BLOCK_DK=max(16, triton.next_power_of_2(k_dim)),
        BLOCK_DV=block_dv,
        BLOCK_N=BLOCK_N,
        ITEM_FIELDS=ITEM_FIELDS,
        SOFTCAP=props.softcap is not None,
        PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )

    def partials(
        x: torch.Tensor,
    ) -> torch.Tensor:  # [items, kv_heads, lanes(, d)] -> [kv_heads, partials, per_kv(, d)]
        x = x[:, :, :lanes].unflatten(2, (table.slot_lanes, per_kv)).transpose(0, 1)
        return x.flatten(1, 2)

    out = merge_partials(partials(m), partials(total), partials(acc[..., :v_dim]), table.merge_table, props)
    return out.to(query.dtype)[None]
