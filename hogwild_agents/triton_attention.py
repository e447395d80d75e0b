"""Block attention over the shared cache as a Triton kernel (FlashDecoding-style split-K).

The forward's work is cut into *items*: one (row, block, key chunk) each, at most `chunk_length` keys.
One program per (item, kv head) rotates the row's queries by -offset of its block (RoPE trick), scores
the chunk's stored keys tile by tile with an online softmax, and writes a partial result: running max,
sum of exponentials and the unnormalised output. The partials of a row are then merged by a
log-sum-exp reduction. Keys are read in place from the paged pool through each block's page table:
nothing is copied or re-rotated.

Runs on CUDA; with `TRITON_INTERPRET=1` set before this module is imported, Triton's interpreter runs
the same kernel on the CPU (slowly), which is how the tests check it against the reference.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hogwild_agents.cache import PAGE_SIZE, pages_for
from hogwild_agents.plan import ForwardPlan

MIN_CHUNK = 256  # keys per item at the least
SPLITS = 8  # the longest view is cut into about this many chunks, so that long blocks spread over programs
MAX_QUERIES = 128  # queries per (row, kv head) the kernel takes; prefill-sized forwards use matmuls
BLOCK_N = 64  # keys per tile inside a program
META_FIELDS = 7  # int32 fields per item: row, table start, start, end, visible, is_target, pad


@triton.jit
def _partial_block_attention(
    q_ptr,  # [rows, heads, q_len, dim], already scaled
    k_ptr,  # [kv_heads, pages, PAGE, dim] of one layer of the pool
    v_ptr,
    pages_ptr,  # [table entries] int32: the page tables of every item's block, concatenated
    meta_ptr,  # [items, META_FIELDS] int32
    cos_ptr,  # [items, rot] fp32: rotation of the queries by -offset of the item's block
    sin_ptr,
    m_ptr,  # [all items, kv_heads, BLOCK_Q] fp32 partial max
    l_ptr,  # [all items, kv_heads, BLOCK_Q] fp32 partial sum of exponentials
    acc_ptr,  # [all items, kv_heads, BLOCK_Q, BLOCK_D] fp32 partial output
    first_item,  # this launch's items start here in the partial buffers
    stride_qr,
    stride_qh,
    stride_qt,
    stride_kh,
    stride_kp,
    stride_kt,
    stride_vh,
    stride_vp,
    stride_vt,
    kv_heads,
    q_len,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    META_FIELDS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    meta = meta_ptr + item * META_FIELDS
    row = tl.load(meta)
    table = tl.load(meta + 1)
    start = tl.load(meta + 2)
    end = tl.load(meta + 3)
    visible = tl.load(meta + 4)
    is_target = tl.load(meta + 5)
    pad = tl.load(meta + 6)

    # queries of this kv head: index j = head_in_group * q_len + t
    j = tl.arange(0, BLOCK_Q)
    t = j % q_len
    head = kv_head * PER_KV + j // q_len
    q_valid = j < PER_KV * q_len
    d = tl.arange(0, BLOCK_D)
    d_valid = d < HEAD_DIM
    q_base = q_ptr + row * stride_qr + head[:, None] * stride_qh + t[:, None] * stride_qt
    q = tl.load(q_base + d[None, :], mask=q_valid[:, None] & d_valid[None, :], other=0.0).to(tl.float32)

    # rotate by -offset: x * cos + rotate_half(x) * sin on the first ROT_DIM entries
    half = ROT_DIM // 2
    in_rot = d < ROT_DIM
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    q_partner = tl.load(q_base + partner[None, :], mask=q_valid[:, None] & in_rot[None, :], other=0.0).to(
        tl.float32
    )
    cos = tl.load(cos_ptr + item * ROT_DIM + d, mask=in_rot, other=1.0)
    sin = tl.load(sin_ptr + item * ROT_DIM + d, mask=in_rot, other=0.0)
    q = q * cos[None, :] + q_partner * (sign * sin)[None, :]

    # keys visible to query t: local index < visible (+ t - pad + 1 in the block the row writes)
    limit = visible + tl.where(is_target != 0, tl.maximum(t - pad + 1, 0), 0)

    m_i = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_Q,), tl.float32)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_valid = n < end
        page = tl.load(pages_ptr + table + n // PAGE, mask=n_valid, other=0)
        in_page = n % PAGE
        k = tl.load(
            k_base + page[:, None] * stride_kp + in_page[:, None] * stride_kt + d[None, :],
            mask=n_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION)  # [BLOCK_Q, BLOCK_N], fp32
        seen = n_valid[None, :] & (n[None, :] < limit[:, None]) & q_valid[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(
            v_base + page[:, None] * stride_vp + in_page[:, None] * stride_vt + d[None, :],
            mask=n_valid[:, None] & d_valid[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new

    out = (first_item + item) * kv_heads + kv_head
    tl.store(m_ptr + out * BLOCK_Q + j, m_i)
    tl.store(l_ptr + out * BLOCK_Q + j, l_i)
    tl.store(acc_ptr + (out * BLOCK_Q + j[:, None]) * BLOCK_D + d[None, :], acc)


@triton.jit
def _merge_partials(
    m_ptr,  # [items, kv_heads, BLOCK_Q]
    l_ptr,
    acc_ptr,  # [items, kv_heads, BLOCK_Q, BLOCK_D]
    row_items_ptr,  # [items] int32: item ids ordered by row
    row_starts_ptr,  # [rows + 1] int32: row r's items are row_items[row_starts[r]:row_starts[r + 1]]
    out_ptr,  # [rows, q_len, heads, dim] in the query's dtype
    stride_or,
    stride_ot,
    stride_oh,
    kv_heads,
    q_len,
    HEAD_DIM: tl.constexpr,
    PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    begin = tl.load(row_starts_ptr + row)
    end = tl.load(row_starts_ptr + row + 1)
    j = tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    m_run = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    l_run = tl.zeros((BLOCK_Q,), tl.float32)
    acc_run = tl.zeros((BLOCK_Q, BLOCK_D), tl.float32)
    for k in range(begin, end):
        base = tl.load(row_items_ptr + k) * kv_heads + kv_head
        m = tl.load(m_ptr + base * BLOCK_Q + j)
        m_new = tl.maximum(m_run, m)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        old_scale = tl.exp(m_run - m_safe)
        new_scale = tl.exp(m - m_safe)
        l_run = l_run * old_scale + tl.load(l_ptr + base * BLOCK_Q + j) * new_scale
        acc = tl.load(acc_ptr + (base * BLOCK_Q + j[:, None]) * BLOCK_D + d[None, :])
        acc_run = acc_run * old_scale[:, None] + acc * new_scale[:, None]
        m_run = m_new
    out = acc_run / tl.where(l_run > 0, l_run, 1.0)[:, None]  # a query that saw no key gets zeros
    t = j % q_len
    head = kv_head * PER_KV + j // q_len
    pointers = out_ptr + row * stride_or + t[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    valid = (j < PER_KV * q_len)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(pointers, out.to(out_ptr.dtype.element_ty), mask=valid)


@dataclass
class BlockTable:
    """The forward's items and page tables; built once per forward and shared by all layers."""

    meta: torch.Tensor  # [items, META_FIELDS] int32
    pages: torch.Tensor  # [table entries] int32
    cos: torch.Tensor  # [items, rot]
    sin: torch.Tensor
    item_rows: torch.Tensor  # [items] row of each item
    row_items: torch.Tensor  # [items] int32 item ids ordered by row
    row_starts: torch.Tensor  # [rows + 1] int32 offsets into row_items
    query_index: torch.Tensor  # [rows * q_len] packed token of each (row, query) slot (0: padding)
    valid: torch.Tensor  # [rows * q_len] bool
    q_len: int

    @property
    def n_items(self) -> int:
        return self.meta.shape[0]

    @classmethod
    def from_plan(cls, plan: ForwardPlan) -> BlockTable:
        metas: list[list[int]] = []
        offsets: list[int] = []
        pages: list[int] = []
        q_len = max(len(row.token_ids) for row in plan.rows)
        chunk = chunk_length(plan)
        query_index, valid = [], []
        for n, row in enumerate(plan.rows):
            new = len(row.token_ids)
            pad = q_len - new
            query_index += [0] * pad + list(plan.row_tokens(n))
            valid += [False] * pad + [True] * new
            for seg in row.segments:
                target = seg is row.target
                length = seg.visible + (new if target else 0)
                table = len(pages)
                pages += row.cache.block(seg.group, seg.slot).pages[: pages_for(length)]
                for start in range(0, length, chunk):
                    metas.append([n, table, start, min(length, start + chunk), seg.visible, int(target), pad])
                    offsets.append(-seg.offset)
        device = plan.device
        cos, sin = plan.rotations.cos_sin(torch.tensor(offsets, device=device), torch.float32)
        item_rows = [m[0] for m in metas]
        by_row = sorted(range(len(metas)), key=item_rows.__getitem__)
        counts = [0] * (len(plan.rows) + 1)
        for row in item_rows:
            counts[row + 1] += 1
        return cls(
            meta=torch.tensor(metas, dtype=torch.int32, device=device),
            pages=torch.tensor(pages or [0], dtype=torch.int32, device=device),
            cos=cos.contiguous(),
            sin=sin.contiguous(),
            item_rows=torch.tensor(item_rows, device=device),
            row_items=torch.tensor(by_row, dtype=torch.int32, device=device),
            row_starts=torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=device),
            query_index=torch.tensor(query_index, dtype=torch.long, device=device),
            valid=torch.tensor(valid, device=device),
            q_len=q_len,
        )


def chunk_length(plan: ForwardPlan) -> int:
    """Keys per item: long enough that the partial results stay small next to the keys they summarise,
    short enough that the longest view is split over about SPLITS programs per (row, kv head)."""
    longest = max(row.view_length for row in plan.rows)
    return max(MIN_CHUNK, -(-longest // SPLITS))


def fits(plan: ForwardPlan, query: torch.Tensor) -> bool:
    """True when the kernel takes this forward: at most MAX_QUERIES queries per (row, kv head)."""
    per_kv = query.shape[1] // plan.pool.shape.kv_heads
    return per_kv * max(len(row.token_ids) for row in plan.rows) <= MAX_QUERIES


def triton_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Block attention by the Triton kernel. query: [1, heads, tokens, dim] -> [1, tokens, heads, dim]."""
    _, heads, _, dim = query.shape
    kv_heads = plan.pool.shape.kv_heads
    per_kv = heads // kv_heads
    table = plan.derived.get("triton")
    if table is None:
        table = plan.derived["triton"] = BlockTable.from_plan(plan)
    rows, q_len = len(plan.rows), table.q_len
    block_q = max(16, triton.next_power_of_2(per_kv * q_len))
    block_d = max(16, triton.next_power_of_2(dim))
    q = (query[0][:, table.query_index] * scaling).view(heads, rows, q_len, dim).transpose(0, 1).contiguous()
    m = torch.empty(table.n_items, kv_heads, block_q, dtype=torch.float32, device=query.device)
    denominators = torch.empty_like(m)
    acc = torch.empty(table.n_items, kv_heads, block_q, block_d, dtype=torch.float32, device=query.device)
    k, v = plan.pool.k[layer], plan.pool.v[layer]  # [kv_heads, pages, PAGE, dim]
    _partial_block_attention[(table.n_items, kv_heads)](
        q,
        k,
        v,
        table.pages,
        table.meta,
        table.cos,
        table.sin,
        m,
        denominators,
        acc,
        0,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        kv_heads,
        q_len,
        PAGE=PAGE_SIZE,
        HEAD_DIM=dim,
        ROT_DIM=plan.rotations.rot_dim,
        PER_KV=per_kv,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
        BLOCK_N=BLOCK_N,
        META_FIELDS=META_FIELDS,
        PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
    )
    out = torch.empty(rows, q_len, heads, dim, dtype=query.dtype, device=query.device)
    merge_rows(m, denominators, acc, table.row_items, table.row_starts, out)
    return out.view(rows * q_len, heads, dim)[table.valid][None]


def merge_rows(
    m: torch.Tensor,
    denominators: torch.Tensor,
    acc: torch.Tensor,
    row_items: torch.Tensor,
    row_starts: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """Merge the partials of each row's items (the merge kernel) into `out` [rows, q_len, heads, dim]."""
    rows, q_len, heads, dim = out.shape
    kv_heads, block_q, block_d = acc.shape[1:]
    _merge_partials[(rows, kv_heads)](
        m,
        denominators,
        acc,
        row_items,
        row_starts,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        kv_heads,
        q_len,
        HEAD_DIM=dim,
        PER_KV=heads // kv_heads,
        BLOCK_Q=block_q,
        BLOCK_D=block_d,
    )
    return out


def merge_partials(
    m: torch.Tensor, denominators: torch.Tensor, acc: torch.Tensor, item_rows: torch.Tensor, rows: int
) -> torch.Tensor:
    """Log-sum-exp merge of per-item partial softmaxes into per-row outputs [rows, kv_heads, q, dim];
    the reference for the merge kernel. A query that saw no key at all (a padding position) gets zeros."""
    index = item_rows[:, None, None].expand_as(m)
    row_max = torch.full((rows, *m.shape[1:]), float("-inf"), device=m.device)
    row_max = row_max.scatter_reduce(0, index, m, reduce="amax")
    row_max = row_max.nan_to_num(neginf=0.0)
    weights = torch.exp(m - row_max[item_rows])  # exp(-inf) = 0 for items that saw nothing
    total = torch.zeros_like(row_max).index_add_(0, item_rows, denominators * weights)
    out = torch.zeros(rows, *acc.shape[1:], device=acc.device).index_add_(
        0, item_rows, acc * weights[..., None]
    )
    return out / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
