"""Concurrent attention over the KV pool, plugged into transformers' attention registry.

The model's attention module projects q/k/v and rotates them at the tokens' view positions, then calls
the registered function `hogwild`. With a `hogwild_plan` keyword (our forward passes) it stores the new
keys/values in the pool and attends over each row's view; without one it is the model's own attention
(SDPA, or the family's eager attention where SDPA cannot honour a feature such as soft-capping or
sinks), so the same model object still works with `generate` and ordinary caches. With a
`hogwild_probe` keyword it records the call (`architecture.inspect_model`).

Every implementation honours the layer's `LayerProps` (scaling, soft-capping, sliding window, chunk,
sinks, the layer's own rotation):
- `fast_attention`: each block of the forward read ONCE, by the stacked queries of every row that sees
  it (the plan's `ReadBatch`es: one batched matmul per batch), each query's partials merged by
  log-sum-exp (`block_attention.py`).
- `static_attention` (static_step.py): the same over fixed-shape tiles, for the compiled decode step.
- `triton` (hogwild_agents.triton_attention, CUDA): the same reads as one Triton kernel reading keys in
  place through the page tables. Forwards with long rows (prefill chunks) go to `fast_attention`.
- `eager_attention`: the reference. Per row, it materialises the row's view (keys re-rotated to their
  view positions, concatenated in view order) and runs textbook masked softmax attention.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function, sdpa_mask

from hogwild_agents.architecture import AttentionProbe, mask_sentinel, stray_call
from hogwild_agents.block_attention import (
    LayerProps,
    merge_partials,
    partial_attention,
    rotated_queries,
    visible_keys,
)
from hogwild_agents.plan import ForwardPlan, ReadBatch
from hogwild_agents.rotary import RotarySpec

ATTENTION_NAME = "hogwild"
IMPLEMENTATIONS = ("fast", "eager", "triton")
# (plan, layer, query [1, heads, tokens, q_dim], props) -> [1, tokens, heads, v_dim]
AttentionFn = Callable[[Any, int, torch.Tensor, LayerProps], torch.Tensor]


def layer_props(plan: Any, layer: int, scaling: float, kwargs: dict[str, Any]) -> LayerProps:
    """The layer's attention properties: what its module passes, and its rotation and mask (probed)."""
    spec = plan.attention.layers[layer]
    softcap = kwargs.get("softcap")
    return LayerProps(
        scaling=scaling,
        rotary=spec.rotary,
        softcap=float(softcap) if softcap else None,
        window=spec.sliding_window,
        chunk=spec.chunk_size,
        sinks=kwargs.get("s_aux"),
    )


def store_new_kv(plan: Any, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
    """Write the forward's new K (re-rotated to block-local positions) and V into the pool."""
    local_key = key[0]  # [kv_heads, tokens, k_dim]
    rotary = plan.rotations.layer(layer)
    unrotation = None if rotary is None else unrotation_of(plan, rotary)
    if unrotation is not None:
        local_key = rotary.rotate(local_key.float(), *unrotation)
    plan.pool.write(layer, plan.write_pages, plan.write_offsets, local_key, value[0])


def unrotation_of(plan: Any, rotary: RotarySpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos/sin [tokens, rot] turning each new key from its view position to its block-local position
    (None when every block written starts at view position 0); one table per rotation, for all layers."""
    offsets = plan.write_block_offsets
    if offsets is None:
        return None
    key = ("unrotate", rotary.key)
    if key not in plan.derived:
        plan.derived[key] = rotary.cos_sin(-offsets, torch.float32)
    return plan.derived[key]


# ---- the fast path -------------------------------------------------------------------------------------
def fast_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, props: LayerProps) -> torch.Tensor:
    """Each block read once by all its queries.
    query: [1, heads, tokens, q_dim] -> [1, tokens, heads, v_dim]."""
    kv_heads = plan.pool.shape.kv_heads
    storage_k, storage_v = plan.pool.k[layer], plan.pool.v[layer]  # [kv_heads, pages, PAGE, dim]
    tops, totals, accs = [], [], []
    for index, batch in enumerate(plan.batches):
        keys, values = _batch_keys(storage_k, batch), _batch_keys(storage_v, batch)
        rotation = _read_rotation(plan, index, batch, props.rotary)
        q = rotated_queries(query[0], batch.token, rotation, props, kv_heads)
        top, total, acc = partial_attention(
            q, keys, values, _read_visibility(plan, index, batch, props), props
        )
        tops.append(top.flatten(1, 2))
        totals.append(total.flatten(1, 2))
        accs.append(acc.flatten(1, 2))
    cat = (lambda parts: torch.cat(parts, dim=1)) if len(tops) > 1 else (lambda parts: parts[0])
    out = merge_partials(cat(tops), cat(totals), cat(accs), plan.merge_table, props)
    return out.to(query.dtype)[None]


def _batch_keys(storage: torch.Tensor, batch: ReadBatch) -> torch.Tensor:
    """A batch's keys or values: [kv_heads, reads, width, dim] (read in place when consecutive)."""
    kv_heads, dim = storage.shape[0], storage.shape[-1]
    if batch.first_page is not None:
        count = batch.reads * batch.width // storage.shape[2]
        pages = storage[:, batch.first_page : batch.first_page + count]
    else:
        pages = storage[:, batch.page_table]  # [kv_heads, reads, pages, PAGE, dim]
    return pages.reshape(kv_heads, batch.reads, batch.width, dim)


def _read_rotation(
    plan: ForwardPlan, index: int, batch: ReadBatch, rotary: RotarySpec | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos/sin [reads, slots, rot] of -offset per (read, slot) of a batch, for one rotation (cached)."""
    if rotary is None or not batch.rotated:
        return None
    key = ("rotate", index, rotary.key)
    if key not in plan.derived:
        plan.derived[key] = rotary.cos_sin(-batch.offset, torch.float32)
    return plan.derived[key]


def _read_visibility(plan: ForwardPlan, index: int, batch: ReadBatch, props: LayerProps) -> torch.Tensor:
    key = ("seen", index, props.window, props.chunk)
    if key not in plan.derived:
        plan.derived[key] = visible_keys(
            batch.key_start, batch.width, batch.limit, batch.offset, batch.position, props
        )
    return plan.derived[key]


# ---- the reference -------------------------------------------------------------------------------------
def eager_attention(plan: ForwardPlan, layer: int, query: torch.Tensor, props: LayerProps) -> torch.Tensor:
    """Reference attention: materialise each row's view and attend over it. Same shapes as fast."""
    _, heads, tokens, _ = query.shape
    kv_heads = plan.pool.shape.kv_heads
    per_kv = heads // kv_heads
    out = query.new_zeros(tokens, heads, plan.pool.shape.v_dim)
    for n, row in enumerate(plan.rows):
        new = len(row.token_ids)
        keys, values = [], []
        for seg in row.segments:
            length = seg.visible + (new if seg is row.target else 0)
            k, v = row.cache.block_kv(layer, seg.group, seg.slot, length, seg.offset)
            keys.append(k)
            values.append(v)
        k = torch.cat(keys, dim=1).repeat_interleave(per_kv, dim=0).float()  # [heads, view_len, k_dim]
        v = torch.cat(values, dim=1).repeat_interleave(per_kv, dim=0).float()
        span = plan.row_tokens(n)
        q = query[0, :, span.start : span.stop].float()  # [heads, new, q_dim]
        scores = (q @ k.transpose(1, 2)) * props.scaling  # [heads, new, view_len]
        if props.softcap is not None:
            scores = torch.tanh(scores / props.softcap) * props.softcap
        view_len = k.shape[1]
        key_pos = torch.arange(view_len, device=k.device)[None]
        query_pos = (view_len - new + torch.arange(new, device=k.device))[:, None]
        seen = key_pos <= query_pos
        if props.window is not None:
            seen = seen & (query_pos - key_pos < props.window)
        if props.chunk is not None:
            seen = seen & (key_pos // props.chunk == query_pos // props.chunk)
        scores = scores.masked_fill(~seen, float("-inf"))
        if props.sinks is not None:
            sink = props.sinks.float().view(heads, 1, 1).expand(heads, new, 1)
            probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1]
        else:
            probs = scores.softmax(dim=-1)
        out[span.start : span.stop] = (probs @ v).to(query.dtype).transpose(0, 1)
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

    def triton_or_fast(plan: ForwardPlan, layer: int, query: torch.Tensor, props: LayerProps) -> torch.Tensor:
        """The kernel serves decode-sized forwards; prefill-sized ones are compute-bound matmuls."""
        if triton_attention.fits(plan, query):
            return triton_attention.triton_attention(plan, layer, query, props)
        return fast_attention(plan, layer, query, props)

    return triton_or_fast


# ---- the registered function ---------------------------------------------------------------------------
def hogwild_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    hogwild_plan: Any = None,
    hogwild_attend: AttentionFn = fast_attention,
    hogwild_probe: AttentionProbe | None = None,
    hogwild_reference: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention function registered as `hogwild` in transformers' AttentionInterface."""
    if hogwild_probe is not None:
        return hogwild_probe.record(
            module, query, key, value, attention_mask, {"scaling": scaling, **kwargs}
        ), None
    if hogwild_reference is not None:  # reference.view_kv_logits: the model's attention over a view
        return hogwild_reference.attend(module, query, key, value, scaling=scaling, dropout=dropout, **kwargs)
    if hogwild_plan is None:
        stray_call(module)
        return model_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = module.layer_idx
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    props = layer_props(hogwild_plan, layer, scaling, kwargs)
    store_new_kv(hogwild_plan, layer, key, value)
    return hogwild_attend(hogwild_plan, layer, query, props), None


def model_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own attention for a forward without a plan: SDPA, or the family's eager attention
    when the layer passes something SDPA cannot honour (soft-capping, sinks)."""
    if kwargs.get("softcap") is None and kwargs.get("s_aux") is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"{type(module).__name__} needs its family's eager attention, which is missing"
        )
    return eager(module, query, key, value, _additive_mask(attention_mask, query, key), **kwargs)


def _additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor | None:
    """A boolean SDPA mask (or None: causal) as the additive float mask eager attention functions take."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if mask is None:
        if q_len == 1:
            return None
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)[
            None, None
        ]
    if mask.dtype != torch.bool:
        return mask
    blocked = torch.finfo(query.dtype).min
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, blocked)


def hogwild_mask(
    *args: Any, mask_function: Callable = causal_mask_function, **kwargs: Any
) -> torch.Tensor | None:
    """The mask builder registered with the attention: SDPA's (a probe records the mask function)."""
    sentinel = mask_sentinel(mask_function)
    if sentinel is not None:
        return sentinel
    return sdpa_mask(*args, mask_function=mask_function, **kwargs)


def register() -> None:
    """Register the `hogwild` attention (and its SDPA mask) with transformers; idempotent."""
    AttentionInterface.register(ATTENTION_NAME, hogwild_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, hogwild_mask)
