"""Concurrent attention over the shared cache, plugged into transformers' attention registry.

The model's attention module projects q/k/v and rotates them at the rows' view positions, then calls
the registered function `hogwild`. With a `hogwild_plan` keyword (our forward passes) it stores the new
keys/values in the shared cache and attends over each row's view; without one it is plain SDPA, so the
same model object still works with `generate` and ordinary caches.

Two implementations share the cache and the plan:
- `fast_attention`: per block group, queries are rotated by -offset per (row, block) and every block of
  the group is scored in ONE batched matmul against the stored keys (no copies, no key re-rotation);
  the softmax runs jointly over all groups by a log-sum-exp merge.
- `eager_attention`: the reference. Per row, it materialises the row's view (keys re-rotated to their
  view positions, concatenated in view order) and runs textbook masked softmax attention.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from hogwild_agents.cache import SHARED
from hogwild_agents.plan import ForwardPlan

ATTENTION_NAME = "hogwild"
IMPLEMENTATIONS = ("fast", "eager")


def store_new_kv(plan: ForwardPlan, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write the forward's new K (re-rotated to block-local positions) and V into their blocks."""
    rotations = plan.cache.rotations
    local_key = rotations.rotate(key.float(), plan.unrotate_cos, plan.unrotate_sin).to(key.dtype)  # [rows, kv_heads, q_len, dim]
    for group, (rows, cols, slots, positions) in plan.writes.items():
        storage = plan.cache.groups[group]
        storage.k[layer][slots, :, positions] = local_key[rows, :, cols]
        storage.v[layer][slots, :, positions] = value[rows, :, cols]


def fast_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
    """Batched block attention. query: [rows, heads, q_len, dim] -> [rows, q_len, heads, dim]."""
    rows, heads, q_len, dim = query.shape
    rotations = plan.cache.rotations
    kv_heads = plan.cache.shape.kv_heads
    per_kv = heads // kv_heads
    q = (query * scaling).view(rows, kv_heads, per_kv, q_len, dim)

    scores, values = [], []
    for group_index, gp in enumerate(plan.groups):
        if gp is None:
            continue
        storage = plan.cache.groups[group_index]
        slots = storage.n_slots
        keys = storage.k[layer][:, :, : gp.used].reshape(slots * kv_heads, gp.used, dim)
        if group_index == SHARED:
            q_rot = q.permute(1, 0, 2, 3, 4)[None]  # [1, kv_heads, rows, per_kv, q_len, dim]
        else:
            cos = gp.cos[:, :, None, None, None]  # [rows, slots, 1, 1, 1, rot]
            sin = gp.sin[:, :, None, None, None]
            q_rot = rotations.rotate(q[:, None].float(), cos, sin).to(q.dtype).permute(1, 2, 0, 3, 4, 5)
        q_rot = q_rot.reshape(slots * kv_heads, rows * per_kv * q_len, dim)
        s = torch.bmm(q_rot, keys.transpose(1, 2)).view(slots, kv_heads, rows, per_kv, q_len, gp.used)
        s = s.float().masked_fill(~gp.visible, torch.finfo(torch.float32).min)
        scores.append(s)
        values.append(storage.v[layer][:, :, : gp.used].reshape(slots * kv_heads, gp.used, dim))

    # joint softmax over all blocks of all groups: shared max, summed denominators
    peak = torch.stack([s.amax(dim=(0, 5)) for s in scores]).amax(dim=0)  # [kv_heads, rows, per_kv, q_len]
    out = torch.zeros(kv_heads, rows, per_kv, q_len, dim, dtype=torch.float32, device=query.device)
    denominator = torch.zeros_like(peak)
    for s, v in zip(scores, values, strict=True):
        weights = torch.exp(s - peak[None, ..., None])
        denominator += weights.sum(dim=(0, 5))
        slots = weights.shape[0]
        flat = weights.to(v.dtype).reshape(slots * kv_heads, rows * per_kv * q_len, -1)
        out += torch.bmm(flat, v).view(slots, kv_heads, rows, per_kv, q_len, dim).sum(dim=0).float()
    out = out / denominator[..., None]
    return out.to(query.dtype).permute(1, 3, 0, 2, 4).reshape(rows, q_len, heads, dim)


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
        causal = torch.arange(view_len, device=k.device)[None] <= (view_len - new + torch.arange(new, device=k.device))[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[n, pad:] = (scores.softmax(dim=-1) @ v.float()).to(query.dtype).transpose(0, 1)
    return out


def hogwild_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    hogwild_plan: ForwardPlan | None = None,
    hogwild_impl: str = "fast",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as `hogwild` in transformers' AttentionInterface."""
    if hogwild_plan is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    scaling = module.head_dim**-0.5 if scaling is None else scaling
    store_new_kv(hogwild_plan, module.layer_idx, key, value)
    attend = fast_attention if hogwild_impl == "fast" else eager_attention
    return attend(hogwild_plan, module.layer_idx, query, scaling), None


def register() -> None:
    """Register the `hogwild` attention (and its SDPA mask) with transformers; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, hogwild_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
