"""Block attention over the shared cache as a Triton kernel (FlashDecoding-style split-K).

The forward's work is cut into *items*: one (row, block, key chunk) each, at most `chunk_length` keys.
One program per (item, kv head) rotates the row's queries by -offset of its block (RoPE trick), scores
the chunk's stored keys tile by tile with an online softmax, and writes a partial result: running max,
sum of exponentials and the unnormalised output. The partials of a row are then merged by a
log-sum-exp reduction. Keys are read in place from the block storage: nothing is copied or re-rotated.

Runs on CUDA; with `TRITON_INTERPRET=1` set before this module is imported, Triton's interpreter runs
the same kernel on the CPU (slowly), which is how the tests check it against the reference.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from hogwild_agents.attention import fast_attention
from hogwild_agents.plan import ForwardPlan

MIN_CHUNK = 256  # keys per item at the least
SPLITS = 8  # the longest view is cut into about this many chunks, so that long blocks spread over programs
MAX_QUERIES = 128  # queries per (row, kv head) the kernel takes; prefill-sized forwards use matmuls
BLOCK_N = 64  # keys per tile inside a program
META_FIELDS = 7  # row, slot, start, end, visible, is_target, pad


@triton.jit
def _partial_block_attention(
    q_ptr,  # [rows, heads, q_len, dim], already scaled
    k_ptr,  # [slots, kv_heads, capacity, dim] of one layer of one block group
    v_ptr,
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
    stride_ks,
    stride_kh,
    stride_kt,
    stride_vs,
    stride_vh,
    stride_vt,
    kv_heads,
    q_len,
    HEAD_DIM: tl.constexpr,
    ROT_DIM: tl.constexpr,
    PER_KV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    item = tl.program_id(0)
    kv_head = tl.program_id(1)
    meta = meta_ptr + item * 7  # META_FIELDS
    row = tl.load(meta)
    slot = tl.load(meta + 1)
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
    k_base = k_ptr + slot * stride_ks + kv_head * stride_kh
    v_base = v_ptr + slot * stride_vs + kv_head * stride_vh
    for tile in range(start, end, BLOCK_N):
        n = tile + tl.arange(0, BLOCK_N)
        n_valid = n < end
        k = tl.load(
            k_base + n[:, None] * stride_kt + d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0
        )
        s = tl.dot(q.to(k.dtype), tl.trans(k), input_precision=PRECISION)  # [BLOCK_Q, BLOCK_N], fp32
        seen = n_valid[None, :] & (n[None, :] < limit[:, None]) & q_valid[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(
            v_base + n[:, None] * stride_vt + d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0
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
    """The forward's items, grouped by block group; built once per forward and shared by all layers."""

    launches: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, int]]  # group, meta, cos, sin, first
    item_rows: torch.Tensor  # [items] row of each item
    row_items: torch.Tensor  # [items] int32 item ids ordered by row
    row_starts: torch.Tensor  # [rows + 1] int32 offsets into row_items
    n_items: int

    @classmethod
    def from_plan(cls, plan: ForwardPlan) -> BlockTable:
        per_group: dict[int, tuple[list[list[int]], list[int]]] = {}
        item_rows: list[int] = []
        chunk = chunk_length(plan)
        for n, (row, pad) in enumerate(zip(plan.rows, plan.pads, strict=True)):
            new = len(row.token_ids)
            for seg in row.segments:
                target = seg is row.target
                length = seg.visible + (new if target else 0)
                metas, offsets = per_group.setdefault(seg.group, ([], []))
                for start in range(0, length, chunk):
                    metas.append(
                        [n, seg.slot, start, min(length, start + chunk), seg.visible, int(target), pad]
                    )
                    offsets.append(-seg.offset)
        device = plan.cache.shape.device
        launches, first = [], 0
        for group in sorted(per_group):
            metas, offsets = per_group[group]
            cos, sin = plan.cache.rotations.cos_sin(torch.tensor(offsets, device=device), torch.float32)
            meta = torch.tensor(metas, dtype=torch.int32, device=device)
            launches.append((group, meta, cos.contiguous(), sin.contiguous(), first))
            item_rows.extend(m[0] for m in metas)
            first += len(metas)
        by_row = sorted(range(first), key=item_rows.__getitem__)
        counts = [0] * (len(plan.rows) + 1)
        for row in item_rows:
            counts[row + 1] += 1
        starts = list(itertools.accumulate(counts))
        return cls(
            launches,
            torch.tensor(item_rows, device=device),
            torch.tensor(by_row, dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device),
            first,
        )


def chunk_length(plan: ForwardPlan) -> int:
    """Keys per item: long enough that the partial results stay small next to the keys they summarise,
    short enough that the longest view is split over about SPLITS programs per (row, kv head)."""
    longest = max(row.view_length for row in plan.rows)
    return max(MIN_CHUNK, -(-longest // SPLITS))


def triton_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Block attention by the Triton kernel. query: [rows, heads, q_len, dim] -> [rows, q_len, heads, dim].

    The kernel serves decode-sized forwards (a few new tokens per row); prefill-sized ones, which are
    compute-bound, go to the batched-matmul path."""
    rows, heads, q_len, dim = query.shape
    kv_heads = plan.cache.shape.kv_heads
    per_kv = heads // kv_heads
    if per_kv * q_len > MAX_QUERIES:
        return fast_attention(plan, layer, query, scaling)
    table = plan.derived.get("triton")
    if table is None:
        table = plan.derived["triton"] = BlockTable.from_plan(plan)
    block_q = max(16, triton.next_power_of_2(per_kv * q_len))
    block_d = max(16, triton.next_power_of_2(dim))
    q = (query * scaling).contiguous()
    m = torch.empty(table.n_items, kv_heads, block_q, dtype=torch.float32, device=query.device)
    denominators = torch.empty_like(m)
    acc = torch.empty(table.n_items, kv_heads, block_q, block_d, dtype=torch.float32, device=query.device)
    for group, meta, cos, sin, first in table.launches:
        k = plan.cache.groups[group].k[layer]
        v = plan.cache.groups[group].v[layer]
        _partial_block_attention[(meta.shape[0], kv_heads)](
            q,
            k,
            v,
            meta,
            cos,
            sin,
            m,
            denominators,
            acc,
            first,
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
            HEAD_DIM=dim,
            ROT_DIM=plan.cache.rotations.rot_dim,
            PER_KV=per_kv,
            BLOCK_Q=block_q,
            BLOCK_D=block_d,
            BLOCK_N=BLOCK_N,
            PRECISION="ieee" if k.dtype == torch.float32 else "tf32",
        )
    out = torch.empty(rows, q_len, heads, dim, dtype=query.dtype, device=query.device)
    return merge_rows(m, denominators, acc, table.row_items, table.row_starts, out)


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
