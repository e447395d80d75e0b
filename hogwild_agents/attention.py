"""Concurrent attention over the shared cache, plugged into transformers' attention registry.

The model's attention module projects q/k/v and rotates them at the rows' view positions, then calls
the registered function `hogwild`. With a `hogwild_plan` keyword (our forward passes) it stores the new
keys/values in the shared cache and attends over each row's view; without one it is plain SDPA, so the
same model object still works with `generate` and ordinary caches.

Two implementations share the cache and the plan:
- `fast_attention`: per block group, queries are rotated by -offset per (row, block) and every block of
  the group is scored in ONE batched matmul against the stored keys (no copies, no key re-rotation);
  the softmax runs jointly over all groups by a log-sum-exp merge.
- `triton_attention` (hogwild_agents.triton_attention, CUDA): the same block attention as one Triton
  kernel, split-K over (row, block, key chunk) items with a log-sum-exp merge.
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

from hogwild_agents.plan import ForwardPlan

ATTENTION_NAME = "hogwild"
IMPLEMENTATIONS = ("fast", "eager", "triton")
AttentionFn = Callable[[ForwardPlan, int, torch.Tensor, float], torch.Tensor]


def store_new_kv(plan: ForwardPlan, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write the forward's new K (re-rotated to block-local positions) and V into their blocks."""
    local_key = key  # [rows, kv_heads, q_len, dim]
    if plan.unrotate_cos is not None:
        rotations = plan.cache.rotations
        local_key = rotations.rotate(key.float(), plan.unrotate_cos, plan.unrotate_sin).to(key.dtype)
    for group, (rows, cols, slots, positions) in plan.writes.items():
        storage = plan.cache.groups[group]
        if rows is None:  # one token per row, all into this group
            storage.k[layer][slots, :, positions] = local_key[:, :, 0]
            storage.v[layer][slots, :, positions] = value[:, :, 0]
        else:
            storage.k[layer][slots, :, positions] = local_key[rows, :, cols]
            storage.v[layer][slots, :, positions] = value[rows, :, cols]


def fast_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Batched block attention. query: [rows, heads, q_len, dim] -> [rows, q_len, heads, dim].

    Every used group is scored in one bmm (slot groups against a per-(row, slot) rotated query); the
    scores of all groups share one key axis, one mask bias and one softmax."""
    rows, heads, q_len, dim = query.shape
    kv_heads = plan.cache.shape.kv_heads
    per_kv = heads // kv_heads
    n = rows * per_kv * q_len  # queries per kv head
    q = (query * scaling).view(rows, kv_heads, per_kv, q_len, dim)
    q = q.transpose(0, 1).contiguous()  # [kv_heads, rows, per_kv, q_len, dim]
    q_flat = q.view(kv_heads, n, dim)
    q_float = None

    scores = []  # each [kv_heads, n, width]
    for gp in plan.groups:
        keys = plan.cache.groups[gp.group].k[layer][:, :, : gp.used]  # [slots, kv_heads, used, dim]
        if gp.cos is None:  # SHARED: one block at offset 0, no rotation
            scores.append(torch.matmul(q_flat, keys[0].transpose(1, 2)))
            continue
        q_float = q.float() if q_float is None else q_float
        # [slots, kv_heads, rows, per_kv, q_len, dim]
        q_rot = plan.cache.rotations.rotate(q_float[None], gp.cos, gp.sin).to(q.dtype)
        s = torch.matmul(
            q_rot.reshape(gp.slots * kv_heads, n, dim),
            keys.reshape(gp.slots * kv_heads, gp.used, dim).transpose(1, 2),
        )  # [slots * kv_heads, n, used]
        scores.append(
            s.view(gp.slots, kv_heads, n, gp.used).permute(1, 2, 0, 3).reshape(kv_heads, n, gp.width)
        )
    s = (torch.cat(scores, dim=-1) if len(scores) > 1 else scores[0]).float()  # [kv_heads, n, keys]
    if plan.bias is not None:  # [rows, 1, q_len, keys]
        s = s.view(kv_heads, rows, per_kv, q_len, -1) + plan.bias
    weights = torch.softmax(s, dim=-1).to(query.dtype).view(kv_heads, n, -1)

    out = None  # [kv_heads, n, dim]
    start = 0
    for gp in plan.groups:
        w = weights[:, :, start : start + gp.width]
        start += gp.width
        values = plan.cache.groups[gp.group].v[layer][:, :, : gp.used]  # [slots, kv_heads, used, dim]
        if gp.cos is None:
            part = torch.matmul(w, values[0])
        else:
            w = (
                w.reshape(kv_heads, n, gp.slots, gp.used)
                .permute(2, 0, 1, 3)
                .reshape(gp.slots * kv_heads, n, gp.used)
            )
            part = torch.bmm(w, values.reshape(gp.slots * kv_heads, gp.used, dim))
            part = part.view(gp.slots, kv_heads, n, dim).sum(dim=0)
        part = part.float() if query.dtype != torch.float32 else part
        out = part if out is None else out + part
    out = out.to(query.dtype).view(kv_heads, rows, per_kv, q_len, dim)
    return out.permute(1, 3, 0, 2, 4).reshape(rows, q_len, heads, dim)


def eager_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Reference attention: materialise each row's view and attend over it. Same shapes as fast."""
    rows, heads, q_len, dim = query.shape
    per_kv = heads // plan.cache.shape.kv_heads
    out = torch.zeros(rows, q_len, heads, dim, dtype=query.dtype, device=query.device)
    for n, (row, pad) in enumerate(zip(plan.rows, plan.pads, strict=True)):
        new = len(row.token_ids)
        keys, values = [], []
        for seg in row.segments:
            length = seg.visible + (new if seg is row.target else 0)
            k, v = plan.cache.block_kv(layer, seg.group, seg.slot, length, seg.offset)
            keys.append(k)
            values.append(v)
        k = torch.cat(keys, dim=1).repeat_interleave(per_kv, dim=0)  # [heads, view_len, dim]
        v = torch.cat(values, dim=1).repeat_interleave(per_kv, dim=0)
        scores = (query[n, :, pad:].float() @ k.float().transpose(1, 2)) * scaling  # [heads, new, view_len]
        view_len = k.shape[1]
        causal = (
            torch.arange(view_len, device=k.device)[None]
            <= (view_len - new + torch.arange(new, device=k.device))[:, None]
        )
        scores = scores.masked_fill(~causal, float("-inf"))
        out[n, pad:] = (scores.softmax(dim=-1) @ v.float()).to(query.dtype).transpose(0, 1)
    return out


def implementation(name: str, device: torch.device | str) -> AttentionFn:
    """The attention function called `name` for a cache on `device`; a clear error when it cannot run."""
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
        from hogwild_agents.triton_attention import triton_attention
    except ImportError as error:
        raise ValueError(
            f"attention='triton' needs the `triton` package ({error}); install it (`pip install triton`, "
            "it comes with CUDA builds of torch) or use attention='fast'."
        ) from error
    return triton_attention


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
