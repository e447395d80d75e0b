"""Per-worker logits processors: change a worker's next-token scores before it samples.

A processor follows transformers' `LogitsProcessor` call convention, so the library's own processors
(`SuppressTokensLogitsProcessor`, `NoBadWordsLogitsProcessor`, `RepetitionPenaltyLogitsProcessor`, ...)
work unchanged: `processor(input_ids, scores) -> scores` with `input_ids` [1, seq] (the prompt followed
by the worker's own stream) and `scores` [1, vocab] (fp32), both on the CPU. Processors apply to sampled
tokens only; forced tokens, headers and interjections are taken as given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from hogwild_agents.errors import LogitsProcessorError

LogitsProcessorFn = Callable[[torch.LongTensor, torch.FloatTensor], torch.FloatTensor]
LogitsProcessorsArg = Sequence[LogitsProcessorFn] | Mapping[int, Sequence[LogitsProcessorFn]] | None


def per_worker_processors(processors: LogitsProcessorsArg, n_workers: int) -> list[list[LogitsProcessorFn]]:
    """Resolve `processors` (one list for every worker, or {worker index: list}) to a list per worker."""
    if processors is None:
        return [[] for _ in range(n_workers)]
    if isinstance(processors, Mapping):
        unknown = [k for k in processors if not isinstance(k, int) or not 0 <= k < n_workers]
        if unknown:
            raise ValueError(
                f"logits_processors has keys {unknown} but workers are numbered 0..{n_workers - 1}; "
                "key the mapping by worker index."
            )
        resolved = [list(processors.get(i, ())) for i in range(n_workers)]
    else:
        resolved = [list(processors) for _ in range(n_workers)]
    for fns in resolved:
        for fn in fns:
            if not callable(fn):
                raise TypeError(
                    f"logits processor {fn!r} is not callable; pass objects called as "
                    "processor(input_ids, scores) -> scores, like transformers' LogitsProcessor."
                )
    return resolved


def apply_processors(
    processors: Sequence[LogitsProcessorFn], input_ids: list[int], logits: torch.Tensor, worker: str
) -> torch.Tensor:
    """Run `processors` in order on one worker's logits [vocab]; return the processed fp32 logits."""
    ids = torch.tensor([input_ids], dtype=torch.long)  # on the CPU, like transformers' default processors
    scores = logits.float().cpu()[None].clone()
    for fn in processors:
        try:
            scores = fn(ids, scores)
        except Exception as error:
            raise LogitsProcessorError(
                f"logits processor {fn!r} failed for worker {worker}: {error}"
            ) from error
        if not isinstance(scores, torch.Tensor) or scores.shape != (1, logits.shape[-1]):
            raise LogitsProcessorError(
                f"logits processor {fn!r} for worker {worker} must return scores of shape "
                f"(1, {logits.shape[-1]}), got {getattr(scores, 'shape', type(scores).__name__)}."
            )
    if torch.isneginf(scores).all() or torch.isnan(scores).any():
        raise LogitsProcessorError(
            f"logits processors left worker {worker} no token to choose (every score -inf or NaN); "
            "allow at least one token."
        )
    return scores[0].to(logits.device)
