"""What the engine is compared with, built from plain transformers on the same model object.

Without a `hogwild_plan` the engine's registered attention is plain SDPA, so these baselines run the
very model the engine runs. Every baseline starts from one prefilled prompt cache (batch 1), copied to
N rows, so no baseline pays N prompt prefills that the engine does not.

- `DecodeBaseline`: N independent sequences in one `DynamicCache`, one token per row per step: the
  per-token step of `generate` with N sequences, timed step by step.
- `StaticDecodeBaseline`: the same in a `StaticCache` (preallocated to a fixed length), optionally with
  the forward compiled (`torch.compile`; on CUDA mode "reduce-overhead", i.e. CUDA graphs): the
  fastest plain transformers decode of N sequences.
- `generate_step_times`: real `model.generate` with N sequences, timed step by step.
- `message_passing`: N agents that, every K tokens, each re-prefill the others' new tokens into their
  own caches (batched over agents, the cheapest form of that baseline).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, PreTrainedModel, StaticCache


class EmbeddedTokens:
    """Counts the tokens a model actually embeds (a forward hook on its input embeddings), while
    entered: the ground truth for "tokens processed", whatever the caller's own counters say."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.embeddings = model.get_input_embeddings()
        self.count = 0
        self._handle = None

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.count += inputs[0].numel()

    def __enter__(self) -> EmbeddedTokens:
        self._handle = self.embeddings.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: PreTrainedModel, ids: list[int]) -> DynamicCache:
    """A batch-1 cache holding `ids`."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([ids], device=model.device), past_key_values=cache, logits_to_keep=1)
    return cache


def replicate(model: PreTrainedModel, cache: DynamicCache, n: int) -> DynamicCache:
    """A new cache with every layer of the batch-1 `cache` copied to `n` rows."""
    out = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        out.update(layer.keys.repeat(n, 1, 1, 1), layer.values.repeat(n, 1, 1, 1), index)
    return out


def cache_bytes(cache: DynamicCache) -> int:
    return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)


class DecodeBaseline:
    """N independent sequences decoded greedily in lockstep, one forward (batch N) per token."""

    def __init__(self, model: PreTrainedModel, prompt: DynamicCache, last_token: int, n: int) -> None:
        self.model = model
        self.cache = replicate(model, prompt, n)
        self.next = torch.full((n, 1), last_token, device=model.device)  # [n, 1]

    def steps(self, count: int) -> list[float]:
        """Run `count` decode steps; return each step's seconds."""
        times = []
        with torch.inference_mode():
            for _ in range(count):
                start = time.perf_counter()
                out = self.model(input_ids=self.next, past_key_values=self.cache, use_cache=True)
                self.next = out.logits[:, -1].argmax(dim=-1, keepdim=True)
                synchronize(self.model.device)
                times.append(time.perf_counter() - start)
        return times

    @property
    def kv_bytes(self) -> int:
        return cache_bytes(self.cache)

    @property
    def sequence_length(self) -> int:
        return self.cache.get_seq_length()


class StaticDecodeBaseline:
    """N independent sequences decoded greedily in lockstep over a `StaticCache` of `max_len` tokens
    (prompt copied in), one forward (batch N) per token; `compile`: the forward compiled."""

    def __init__(
        self,
        model: PreTrainedModel,
        prompt: DynamicCache,
        last_token: int,
        n: int,
        max_len: int,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        for index, layer in enumerate(prompt.layers):  # the prompt's K/V, copied to N rows
            self.cache.update(layer.keys.repeat(n, 1, 1, 1), layer.values.repeat(n, 1, 1, 1), index)
        self.next = torch.full((n, 1), last_token, device=model.device)  # [n, 1]
        self.forward = model.forward
        if compile:
            mode = "reduce-overhead" if model.device.type == "cuda" else None
            self.forward = torch.compile(model.forward, fullgraph=True, mode=mode)

    def steps(self, count: int) -> list[float]:
        """Run `count` decode steps; return each step's seconds."""
        times = []
        with torch.inference_mode():
            for _ in range(count):
                start = time.perf_counter()
                out = self.forward(input_ids=self.next, past_key_values=self.cache, use_cache=True)
                self.next = out.logits[:, -1].argmax(dim=-1, keepdim=True).clone()
                synchronize(self.model.device)
                times.append(time.perf_counter() - start)
        return times

    @property
    def kv_bytes(self) -> int:
        """Bytes allocated (and read by each step's attention): N x max_len tokens."""
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in self.cache.layers)


class _StepClock(LogitsProcessor):
    """Stamps the time at every decoding step of `generate` (it runs once per step, after the forward)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return scores


def generate_step_times(
    model: PreTrainedModel, prompt: DynamicCache, ids: list[int], n: int, new_tokens: int, repeats: int = 1
) -> list[float]:
    """Seconds of each decoding step of `model.generate` on N copies of `ids` (given the prompt cache,
    generate encodes only the last prompt token; that first step is not counted)."""
    times: list[float] = []
    for _ in range(repeats):
        cache = replicate(model, prompt, n)
        input_ids = torch.tensor([ids] * n, device=model.device)
        clock = _StepClock(model.device)
        with torch.inference_mode():
            model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                past_key_values=cache,
                max_new_tokens=new_tokens + 1,
                min_new_tokens=new_tokens + 1,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock]),
            )
        times += [b - a for a, b in itertools.pairwise(clock.stamps)]
    return times


@dataclass
class MessagePassingResult:
    agents: int
    sync_every: int
    rounds: int
    own_tokens: int  # tokens the agents generated and fed once
    processed_tokens: int  # tokens the model embedded after the prompt (counted by a hook)
    re_encoded_tokens: int  # others' tokens re-prefilled into each agent's cache
    kv_tokens: int  # tokens held in all agents' caches at the end (prompt copies included)
    wall_s: float


def message_passing(
    model: PreTrainedModel, prompt: DynamicCache, last_token: int, n: int, sync_every: int, rounds: int
) -> MessagePassingResult:
    """N agents decode `rounds` x `sync_every` tokens each; between rounds every agent prefills the
    other agents' tokens of that round (in agent order) into its own cache, in one batched forward."""
    cache = replicate(model, prompt, n)
    feed = [[last_token] for _ in range(n)]
    synchronize(model.device)
    start = time.perf_counter()
    with torch.inference_mode(), EmbeddedTokens(model) as embedded:
        for round_index in range(rounds):
            new: list[list[int]] = [[] for _ in range(n)]
            for _ in range(sync_every):
                x = torch.tensor(feed, device=model.device)  # [n, tokens]
                out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
                chosen = out.logits[:, -1].argmax(dim=-1).tolist()
                for agent, token in enumerate(chosen):
                    new[agent].append(token)
                feed = [[token] for token in chosen]
            if round_index < rounds - 1:  # read the others' new text before the next round
                feed = [
                    [t for other in range(n) if other != agent for t in new[other]] + feed[agent]
                    for agent in range(n)
                ]
    synchronize(model.device)
    wall = time.perf_counter() - start
    own = n * rounds * sync_every
    return MessagePassingResult(
        agents=n,
        sync_every=sync_every,
        rounds=rounds,
        own_tokens=own,
        processed_tokens=embedded.count,
        re_encoded_tokens=embedded.count - own,
        kv_tokens=n * cache.get_seq_length(),
        wall_s=wall,
    )
