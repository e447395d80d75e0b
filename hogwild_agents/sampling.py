"""Choosing next tokens from logits: greedy, temperature, top-k and top-p, seeded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hogwild_agents import validation
from hogwild_agents.errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        temperature = validation.real(self.temperature, "temperature", "a finite number >= 0 (0 = greedy)")
        if temperature < 0:
            raise InvalidArgumentError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        top_p = validation.real(self.top_p, "top_p", "a number in (0, 1]")
        if not 0 < top_p <= 1:
            raise InvalidArgumentError(f"top_p must be in (0, 1], got {self.top_p}")
        validation.integer(self.top_k, "top_k", minimum=0)  # 0 = no limit
        validation.seed(self.seed)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed` (or a fresh random seed): same seed, same choices."""
        gen = torch.Generator()
        gen.manual_seed(self.seed if self.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return gen


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> list[int]:
    """One token per row of `logits` [rows, vocab]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1).tolist()
    scores = logits.float().cpu() / params.temperature
    if params.top_k:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_scores.softmax(dim=-1) >= params.top_p  # keep the token crossing top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).tolist()
