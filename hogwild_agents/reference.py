"""Independent references for a worker's next logits, computed by plain transformers.

- `view_kv_logits`: the worker's view materialised as an ordinary `DynamicCache` (each stored key
  re-rotated to its view position, blocks concatenated in view order), then the model's own SDPA
  attention on the worker's pending tokens. It checks everything the engine does to combine cached
  blocks (the RoPE trick, masks, the joint softmax over blocks, batching of workers).
- `from_scratch_logits`: the model run on `view_token_ids(worker)` with no cache at all. It equals the
  engine's logits when every cached token was computed with the same prefix it has in the worker's
  view (one worker, or the first step); with several workers the shared cache holds tokens computed
  in their writers' views, which is the method, not an error.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from hogwild_agents.run import HogwildRun


def view_kv_logits(run: HogwildRun, worker: int) -> torch.Tensor:
    """Logits [vocab] for the worker's last pending token, via a materialised DynamicCache."""
    state = run.workers[worker]
    if not state.pending:
        raise ValueError(f"worker {worker} has no pending tokens; it feeds nothing at the next step")
    segments = run.view(worker)
    cache = DynamicCache(config=run.engine.model.config)
    for layer in range(run.engine.n_layers):
        keys, values = [], []
        for seg in segments:
            k, v = run.cache.block_kv(layer, seg.group, seg.slot, seg.visible, seg.offset)
            keys.append(k)
            values.append(v)
        cache.update(torch.cat(keys, dim=1)[None], torch.cat(values, dim=1)[None], layer)
    past = sum(s.visible for s in segments)
    ids = torch.tensor([state.pending], device=run.engine.device)
    positions = torch.arange(past, past + len(state.pending), device=run.engine.device)[None]
    with torch.inference_mode():
        out = run.engine.model(input_ids=ids, position_ids=positions, past_key_values=cache, use_cache=True)
    return out.logits[0, -1].float()


def from_scratch_logits(run: HogwildRun, worker: int) -> torch.Tensor:
    """Logits [vocab] of the model on the worker's whole view, encoded from scratch."""
    ids = torch.tensor([run.view_token_ids(worker)], device=run.engine.device)
    with torch.inference_mode():
        out = run.engine.model(input_ids=ids, use_cache=False)
    return out.logits[0, -1].float()
