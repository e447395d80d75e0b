"""The attention math every path shares: partial softmax attention of stacked queries over one read of
keys, and the log-sum-exp merge of each query's partials (cascade attention, as in split-K / flash-
decoding and vLLM's or FlashInfer's shared-prefix kernels).

A read is keys [kv_heads, reads, width, k_dim] (one block, or a tile of one) and, per read, `slots`
query tokens that see it, each with its own view offset of the block (the query is rotated by -offset,
the RoPE trick), the block keys it sees (`limit`) and its view position. What a layer adds to plain
causal softmax comes in a `LayerProps`: scaling, logit soft-capping, a sliding window or chunk measured
in view positions, attention sinks (one extra logit per head in every softmax, with no value).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hogwild_agents.rotary import RotarySpec

NEG_INF = float("-inf")


@dataclass(frozen=True)
class LayerProps:
    """What one layer's attention needs beyond plain causal softmax."""

    scaling: float
    rotary: RotarySpec | None
    softcap: float | None = None
    window: int | None = None  # keys with q_pos - k_pos < window are seen
    chunk: int | None = None  # keys in the query's chunk (q_pos // chunk) are seen
    sinks: torch.Tensor | None = None  # [heads] logits of the attention sinks


def rotated_queries(
    query: torch.Tensor,
    token: torch.Tensor,
    rotation: tuple[torch.Tensor, torch.Tensor] | None,
    props: LayerProps,
    kv_heads: int,
) -> torch.Tensor:
    """Queries of each read's slots, scaled and rotated by -offset of the read's block for that slot.

    query: [heads, tokens, q_dim]; token: [reads, slots]; rotation: cos/sin [reads, slots, rot] (None:
    no rotation). Returns [kv_heads, reads, slots * per_kv, q_dim]."""
    heads, _, dim = query.shape
    per_kv = heads // kv_heads
    reads, slots = token.shape
    q = query[:, token.reshape(-1)] * props.scaling  # [heads, reads * slots, dim]
    q = q.view(kv_heads, per_kv, reads, slots, dim)
    if rotation is not None and props.rotary is not None:
        cos, sin = rotation
        q = props.rotary.rotate(q.float(), cos, sin).to(query.dtype)
    return q.permute(0, 2, 3, 1, 4).reshape(kv_heads, reads, slots * per_kv, dim)


def visible_keys(
    key_start: torch.Tensor,
    width: int,
    limit: torch.Tensor,
    offset: torch.Tensor,
    position: torch.Tensor,
    props: LayerProps,
) -> torch.Tensor:
    """[reads, slots, width] True where the slot's query sees the key: local index below its limit, and
    inside its window or chunk of view positions. key_start: [reads]; the others [reads, slots]."""
    local = key_start[:, None] + torch.arange(width, device=key_start.device)  # [reads, width]
    local = local[:, None, :]
    seen = local < limit[..., None]
    if props.window is not None:  # view position offset + local > position - window
        seen = seen & (local > (position - offset - props.window)[..., None])
    if props.chunk is not None:  # same chunk of view positions as the query
        start = torch.div(position, props.chunk, rounding_mode="floor") * props.chunk - offset
        seen = seen & (local >= start[..., None])
    return seen


def partial_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, seen: torch.Tensor, props: LayerProps
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of each read's stacked queries over its keys, unnormalised.

    q: [kv_heads, reads, slots * per_kv, q_dim] (scaled, rotated); keys: [kv_heads, reads, width, k_dim];
    values: [kv_heads, reads, width, v_dim]; seen: [reads, slots, width]. Returns fp32 (max, sum of
    exponentials, exponential-weighted sum of values): [kv_heads, reads, slots, per_kv] twice and
    [kv_heads, reads, slots, per_kv, v_dim]. A query that sees no key gets (-inf, 0, 0)."""
    kv_heads, reads, queries, _ = q.shape
    slots, width = seen.shape[1], seen.shape[2]
    per_kv = queries // slots
    scores = torch.matmul(q, keys.transpose(-1, -2)).float()  # [kv_heads, reads, queries, width]
    if props.softcap is not None:
        scores = torch.tanh(scores / props.softcap) * props.softcap
    scores = scores.view(kv_heads, reads, slots, per_kv, width)
    scores = scores.masked_fill(~seen[None, :, :, None, :], NEG_INF)
    top = scores.amax(dim=-1)  # [kv_heads, reads, slots, per_kv]
    weights = torch.exp(scores - torch.where(torch.isfinite(top), top, 0.0)[..., None])
    total = weights.sum(dim=-1)
    weights = weights.view(kv_heads, reads, queries, width).to(values.dtype)
    acc = torch.matmul(weights, values).float().view(kv_heads, reads, slots, per_kv, -1)
    return top, total, acc


def merge_partials(
    top: torch.Tensor, total: torch.Tensor, acc: torch.Tensor, table: torch.Tensor, props: LayerProps
) -> torch.Tensor:
    """Each token's partials merged by log-sum-exp (with the sinks' logits in every denominator).

    top/total: [kv_heads, partials, per_kv]; acc: [kv_heads, partials, per_kv, v_dim]; table: [tokens, M]
    index of each token's partials (an index >= partials: none). Returns [tokens, heads, v_dim] fp32."""
    kv_heads, _, per_kv = top.shape
    top = torch.cat((top, top.new_full((kv_heads, 1, per_kv), NEG_INF)), dim=1)
    total = torch.cat((total, total.new_zeros(kv_heads, 1, per_kv)), dim=1)
    acc = torch.cat((acc, acc.new_zeros(kv_heads, 1, per_kv, acc.shape[-1])), dim=1)
    table = table.clamp_max(top.shape[1] - 1)
    top, total, acc = top[:, table], total[:, table], acc[:, table]  # [kv_heads, tokens, M, per_kv(, dim)]
    best = top.amax(dim=2)  # [kv_heads, tokens, per_kv]
    sinks = None if props.sinks is None else props.sinks.float().view(kv_heads, 1, per_kv)
    if sinks is not None:
        best = torch.maximum(best, sinks)
    best = torch.where(torch.isfinite(best), best, 0.0)
    scale = torch.exp(top - best[:, :, None])  # [kv_heads, tokens, M, per_kv]
    denominator = (total * scale).sum(dim=2)
    if sinks is not None:
        denominator = denominator + torch.exp(sinks - best)
    out = (acc * scale[..., None]).sum(dim=2) / denominator.clamp_min(torch.finfo(torch.float32).tiny)[
        ..., None
    ]
    tokens = out.shape[1]
    return out.permute(1, 0, 2, 3).reshape(tokens, kv_heads * per_kv, -1)


def scatter_merge(
    top: torch.Tensor,
    total: torch.Tensor,
    acc: torch.Tensor,
    token: torch.Tensor,
    tokens: int,
    props: LayerProps,
) -> torch.Tensor:
    """`merge_partials` for partials listed by token instead of a table (fixed shapes: the static step).

    token: [partials] the token of each partial (`tokens` for padding). Returns [tokens, heads, v_dim]."""
    kv_heads, _, per_kv = top.shape
    index = token[None, :, None].expand_as(top)
    best = top.new_full((kv_heads, tokens + 1, per_kv), NEG_INF).scatter_reduce(1, index, top, "amax")
    sinks = None if props.sinks is None else props.sinks.float().view(kv_heads, 1, per_kv)
    if sinks is not None:
        best = torch.maximum(best, sinks)
    best = torch.where(torch.isfinite(best), best, 0.0)
    scale = torch.exp(top - best.gather(1, index))  # [kv_heads, partials, per_kv]
    denominator = top.new_zeros(kv_heads, tokens + 1, per_kv).index_add(1, token, total * scale)
    if sinks is not None:
        denominator = denominator + torch.exp(sinks - best)
    out = acc.new_zeros(kv_heads, tokens + 1, per_kv, acc.shape[-1]).index_add(
        1, token, acc * scale[..., None]
    )
    out = out[:, :tokens] / denominator[:, :tokens].clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out.permute(1, 0, 2, 3).reshape(tokens, kv_heads * per_kv, -1)
