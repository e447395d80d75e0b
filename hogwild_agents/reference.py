"""Independent references for a worker's next logits, computed by plain transformers.

- `view_kv_logits`: the worker's view materialised (each stored key re-rotated to its view position,
  blocks concatenated in view order), then the model's own forward on the worker's pending tokens,
  whose attention layers attend over [materialised view, new tokens] with the model's own attention
  function (SDPA, or the family's eager attention for soft-capping and sinks) and a mask made by
  transformers' own mask functions (causal, sliding window, chunked). It checks everything the engine
  does to combine cached blocks (the RoPE trick, masks, the joint softmax over blocks, batching of
  workers) for every family, multi-head latent attention included (whose own cache holds latents, not
  the keys and values the attention sees).
- `from_scratch_logits`: the model run on `view_token_ids(worker)` with no cache at all. It equals the
  engine's logits when every cached token was computed with the same prefix it has in the worker's
  view (one worker, or the first step); with several workers the shared cache holds tokens computed
  in their writers' views, which is the method, not an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import (
    and_masks,
    causal_mask_function,
    chunked_causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)

from hogwild_agents.run import HogwildRun


@dataclass
class MaterialisedView:
    """Per layer, K/V of a view at its view positions ([kv_heads, past, k_dim / v_dim]), and how the model
    masks each layer (its sliding window and chunk from its module and config)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    windows: list[int | None]
    chunks: list[int | None]

    @property
    def past(self) -> int:
        return self.keys[0].shape[1]

    def attend(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs
    ):
        """The model's own attention of the new tokens over [view, new tokens] (called by the registered
        function with `hogwild_reference`)."""
        from hogwild_agents.attention import model_attention

        layer = module.layer_idx
        keys = torch.cat((self.keys[layer].to(key.dtype)[None], key), dim=2)
        values = torch.cat((self.values[layer].to(value.dtype)[None], value), dim=2)
        new = query.shape[2]
        window = kwargs.get("sliding_window") or self.windows[layer]
        mask_function = causal_mask_function
        if window is not None:
            mask_function = and_masks(mask_function, sliding_window_causal_mask_function(window))
        if self.chunks[layer] is not None:
            no_padding = torch.zeros(1, dtype=torch.long, device=query.device)
            mask_function = and_masks(
                mask_function, chunked_causal_mask_function(self.chunks[layer], no_padding)
            )
        mask = sdpa_mask(
            batch_size=1,
            q_length=new,
            kv_length=keys.shape[2],
            q_offset=self.past,
            mask_function=mask_function,
            allow_is_causal_skip=False,
            device=query.device,
        )
        return model_attention(module, query, keys, values, mask, **kwargs)


def materialise(run: HogwildRun, worker: int) -> MaterialisedView:
    """The worker's view as per-layer K/V at view positions."""
    keys, values = [], []
    segments = run.view(worker)
    for layer in range(run.engine.n_layers):
        ks, vs = [], []
        for seg in segments:
            k, v = run.cache.block_kv(layer, seg.group, seg.slot, seg.visible, seg.offset)
            ks.append(k)
            vs.append(v)
        keys.append(torch.cat(ks, dim=1))
        values.append(torch.cat(vs, dim=1))
    layers = run.engine.attention.layers
    return MaterialisedView(
        keys, values, [lay.sliding_window for lay in layers], [lay.chunk_size for lay in layers]
    )


def view_kv_logits(run: HogwildRun, worker: int) -> torch.Tensor:
    """Logits [vocab] for the worker's last pending token, over its materialised view."""
    state = run.workers[worker]
    if not state.pending:
        raise ValueError(f"worker {worker} has no pending tokens; it feeds nothing at the next step")
    view = materialise(run, worker)
    device = run.engine.device
    ids = torch.tensor([state.pending], device=device)
    positions = torch.arange(view.past, view.past + len(state.pending), device=device)[None]
    with torch.inference_mode():
        out = run.engine.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=torch.zeros(1, 1, 1, 1, device=device),  # a 4D mask is used as given
            use_cache=False,
            hogwild_reference=view,
        )
    return out.logits[0, -1].float()


def from_scratch_logits(run: HogwildRun, worker: int) -> torch.Tensor:
    """Logits [vocab] of the model on the worker's whole view, encoded from scratch."""
    ids = torch.tensor([run.view_token_ids(worker)], device=run.engine.device)
    with torch.inference_mode():
        out = run.engine.model(input_ids=ids, use_cache=False)
    return out.logits[0, -1].float()
