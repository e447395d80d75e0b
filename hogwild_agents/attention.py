"""Concurrent attention over the KV pool, plugged into transformers' attention registry.

The model's attention module projects q/k/v and rotates them at the tokens' view positions, then calls
the registered function `hogwild`. With a `hogwild_plan` keyword (our forward passes) it stores the new
keys/values in the pool and attends over each row's view; without one it is plain SDPA, so the same
model object still works with `generate` and ordinary caches.

Three implementations share the pool and the plan:
- `fast_attention`: per batch of runs (see `plan.ForwardPlan.batches`) and block group, the queries are
  rotated by -offset per (row, block) and every block of the group is scored in ONE batched matmul
  against the stored keys (pages gathered, never re-rotated); the softmax runs jointly over all groups
  on one key axis with a mask bias.
- `triton` (hogwild_agents.triton_attention, CUDA): the same block attention as one Triton kernel,
  split-K over (row, block, key chunk) items with a log-sum-exp merge, keys read in place through the
  page tables. Forwards with long rows (prefill chunks) go to `fast_attention`.
- `eager_attention`: the reference. Per row, it materialises the row's view (keys re-rotated to their
  view positions, concatenated in view order) and runs textbook masked softmax attention.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from hogwild_agents.plan import AttentionBatch, ForwardPlan, GroupKeys

ATTENTION_NAME = "hogwild"
IMPLEMENTATIONS = ("fast", "eager", "triton")
# (plan, layer, query [1, heads, tokens, dim], scaling) -> [1, tokens, heads, dim]
AttentionFn = Callable[[ForwardPlan, int, torch.Tensor, float], torch.Tensor]


def store_new_kv(plan: ForwardPlan, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write the forward's new K (re-rotated to block-local positions) and V into the pool."""
    local_key = key[0]  # [kv_heads, tokens, dim]
    if plan.unrotate_cos is not None:
        local_key = plan.rotations.rotate(local_key.float(), plan.unrotate_cos, plan.unrotate_sin)
    plan.pool.write(layer, plan.write_pages, plan.write_offsets, local_key, value[0])


def fast_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Batched block attention. query: [1, heads, tokens, dim] -> [1, tokens, heads, dim]."""
    _, heads, tokens, dim = query.shape
    out = query.new_empty(tokens, heads, dim)
    for batch in plan.batches:
        out[batch.tokens] = batch_attention(plan, batch, layer, query[0], scaling)
    return out[None]


def _gathered(storage: torch.Tensor, gk: GroupKeys, runs: int) -> torch.Tensor:
    """A group's keys or values for a batch: [kv_heads, runs, blocks, used, dim]."""
    kv_heads, dim = storage.shape[0], storage.shape[-1]
    if gk.first_page is not None:  # consecutive pages: a view, no copy
        count = runs * gk.blocks * gk.pages
        pages = storage[:, gk.first_page : gk.first_page + count]
    else:
        pages = storage[:, gk.page_table]  # [kv_heads, runs, blocks, pages, page, dim]
    return pages.reshape(kv_heads, runs, gk.blocks, gk.used, dim)


def batch_attention(
    plan: ForwardPlan, batch: AttentionBatch, layer: int, query: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Attention of one batch's valid queries. query: [heads, tokens, dim] -> [valid, heads, dim]."""
    heads, _, dim = query.shape
    kv_heads = plan.pool.shape.kv_heads
    per_kv = heads // kv_heads
    k, rows, q_len = batch.runs, batch.rows, batch.q_len
    n = rows * per_kv * q_len  # queries per (kv head, run)
    q = (query[:, batch.query_index] * scaling).view(kv_heads, per_kv, k, rows, q_len, dim)
    q = q.permute(0, 2, 3, 1, 4, 5).reshape(kv_heads, k, n, dim)  # [kv_heads, runs, n, dim]
    q_float = None
    storage_k, storage_v = plan.pool.k[layer], plan.pool.v[layer]  # [kv_heads, pages, page, dim]

    scores = []  # each [kv_heads, runs, n, width]
    for gk in batch.groups:
        keys = _gathered(storage_k, gk, k)  # [kv_heads, runs, blocks, used, dim]
        if gk.cos is None:  # SHARED: one block at offset 0, no rotation
            scores.append(torch.matmul(q, keys[:, :, 0].transpose(-1, -2)))
            continue
        q_float = q.float().view(kv_heads, k, 1, rows, per_kv, q_len, dim) if q_float is None else q_float
        cos = gk.cos[None, :, :, :, None, None]  # [1, runs, blocks, rows, 1, 1, rot]
        sin = gk.sin[None, :, :, :, None, None]
        q_rot = plan.rotations.rotate(q_float, cos, sin).to(q.dtype).view(kv_heads, k, gk.blocks, n, dim)
        s = torch.matmul(q_rot, keys.transpose(-1, -2))  # [kv_heads, runs, blocks, n, used]
        scores.append(s.permute(0, 1, 3, 2, 4).reshape(kv_heads, k, n, gk.width))
    s = (torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]).float()  # [kv_heads, runs, n, keys]
    s = s.view(kv_heads, k, rows, per_kv, q_len, -1) + batch.bias[None, :, :, None]
    weights = torch.softmax(s, dim=-1).to(query.dtype).view(kv_heads, k, n, -1)

    out = None  # [kv_heads, runs, n, dim]
    start = 0
    for gk in batch.groups:
        w = weights[..., start : start + gk.width]
        start += gk.width
        values = _gathered(storage_v, gk, k)  # [kv_heads, runs, blocks, used, dim]
        if gk.cos is None:
            part = torch.matmul(w, values[:, :, 0])
        else:
            w = w.reshape(kv_heads, k, n, gk.blocks, gk.used).transpose(2, 3)  # [.., blocks, n, used]
            part = torch.matmul(w, values).sum(dim=2)
        part = part.float() if query.dtype != torch.float32 else part
        out = part if out is None else out + part
    out = out.to(query.dtype).view(kv_heads, k, rows, per_kv, q_len, dim)
    out = out.permute(1, 2, 4, 0, 3, 5).reshape(k * rows * q_len, heads, dim)
    return out[batch.valid]


def eager_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference attention: materialise each row's view and attend over it. Same shapes as fast."""
    _, heads, tokens, dim = query.shape
    per_kv = heads // plan.pool.shape.kv_heads
    out = torch.zeros(tokens, heads, dim, dtype=query.dtype, device=query.device)
    for n, row in enumerate(plan.rows):
        new = len(row.token_ids)
        keys, values = [], []
        for seg in row.segments:
            length = seg.visible + (new if seg is row.target else 0)
            k, v = row.cache.block_kv(layer, seg.group, seg.slot, length, seg.offset)
            keys.append(k)
            values.append(v)
        k = torch.cat(keys, dim=1).repeat_interleave(per_kv, dim=0)  # [heads, view_len, dim]
        v = torch.cat(values, dim=1).repeat_interleave(per_kv, dim=0)
        span = plan.row_tokens(n)
        q = query[0, :, span.start : span.stop].float()  # [heads, new, dim]
        scores = (q @ k.float().transpose(1, 2)) * scaling  # [heads, new, view_len]
        view_len = k.shape[1]
        causal = (
            torch.arange(view_len, device=k.device)[None]
            <= (view_len - new + torch.arange(new, device=k.device))[:, None]
        )
        scores = scores.masked_fill(~causal, float("-inf"))
        out[span.start : span.stop] = (scores.softmax(dim=-1) @ v.float()).to(query.dtype).transpose(0, 1)
    return out[None]


def implementation(name: str, device: torch.device | str) -> AttentionFn:
    """The attention function called `name` for a pool on `device`; a clear error when it cannot run."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"Unknown attention {name!r}; choose one of {', '.join(IMPLEMENTATIONS)}.")
    if name == "fast":
        return fast_attention
    if name == "eager":
        return eager_attention
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "attention='triton' runs on CUDA devices; this engine is on "
            f"{torch.device(device).type}. Use attention='fast' here (or set TRITON_INTERPRET=1 before "
            "importing hogwild_agents to run the kernel in Triton's slow CPU interpreter)."
        )
    try:
        from hogwild_agents import triton_attention
    except ImportError as error:
        raise ValueError(
            f"attention='triton' needs the `triton` package ({error}); install it (`pip install triton`, "
            "it comes with CUDA builds of torch) or use attention='fast'."
        ) from error

    def triton_or_fast(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """The kernel serves decode-sized forwards; prefill-sized ones are compute-bound matmuls."""
        if triton_attention.fits(plan, query):
            return triton_attention.triton_attention(plan, layer, query, scaling)
        return fast_attention(plan, layer, query, scaling)

    return triton_or_fast


def hogwild_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    hogwild_plan: ForwardPlan | None = None,
    hogwild_attend: AttentionFn = fast_attention,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as `hogwild` in transformers' AttentionInterface."""
    if hogwild_plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    store_new_kv(hogwild_plan, module.layer_idx, key, value)
    return hogwild_attend(hogwild_plan, module.layer_idx, query, scaling), None


def register() -> None:
    """Register the `hogwild` attention (and its SDPA mask) with transformers; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, hogwild_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
