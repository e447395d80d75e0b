"""Benchmark: prompt-prefix reuse in a 5-turn agent loop with two interleaved conversations.

    python -m benchmarks.prefix_reuse --threads 1

Two conversations take turns (A1, B1, A2, B2, ...); every other turn binds a tool (the middleware
pattern of toggling tools between turns), and each turn appends the model's reply and a new question.
The same loop runs twice in one process: with the engine's prefix cache (several prefixes, replies
kept), and with a cache that keeps only the last prompt. Reported: prompt tokens reused / sent, and
wall time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tools import tool

from hogwild_agents import HogwildEngine
from hogwild_agents.cache import RunCache
from hogwild_agents.prompt_cache import PromptCache
from langchain_hogwild import ChatHogwild

QUESTIONS = {
    "A": [
        "Plan a short trip to Lisbon.",
        "What should I pack?",
        "Any food to try?",
        "Where to stay?",
        "Thanks!",
    ],
    "B": ["Explain prime numbers.", "Is 91 prime?", "What about 97?", "Name a large prime.", "Thanks!"],
}


@tool
def lookup(topic: str) -> str:
    """Look a topic up."""
    return "no result"


class LastPromptOnly(PromptCache):
    """The former behaviour: the K/V of the last prompt only, replies never kept."""

    def store(self, prompt: Sequence[int], cache: RunCache) -> None:
        self.clear()
        super().store(prompt, cache)

    def store_kv(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        if not self._entries:  # called by `store` on the cleared cache; a reply is dropped
            super().store_kv(ids, k, v)


def agent_loop(engine: HogwildEngine, max_tokens: int) -> dict[str, Any]:
    model = ChatHogwild(engine=engine, n_workers=1, protocol=None, max_tokens=max_tokens)
    history: dict[str, list] = {"A": [], "B": []}
    sent = reused = 0
    start = time.perf_counter()
    for turn in range(5):
        for name in ("A", "B"):
            history[name].append(HumanMessage(QUESTIONS[name][turn]))
            llm = model.bind_tools([lookup]) if turn % 2 else model
            reply = llm.invoke(history[name])
            history[name].append(AIMessage(reply.content))
            sent += reply.usage_metadata["input_tokens"]
            reused += reply.usage_metadata["input_token_details"]["cache_read"]
    return {"prompt_tokens": sent, "reused_tokens": reused, "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = HogwildEngine.from_pretrained(device="cpu")
    engine.eos_token_ids = frozenset()  # every reply has max_tokens tokens, in both loops
    agent_loop(engine, 4)  # warm up
    rows = []
    for label, cache in (("last prompt only", LastPromptOnly()), ("prefix cache", PromptCache())):
        engine.prompt_cache = cache
        result = agent_loop(engine, args.max_tokens)
        rows.append((label, result))
    print("| prefix reuse | prompt tokens sent | reused | share | wall time |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        share = r["reused_tokens"] / r["prompt_tokens"]
        print(
            f"| {label} | {r['prompt_tokens']} | {r['reused_tokens']} | {share:.0%} | {r['seconds']:.1f} s |"
        )
    print(
        f"\nwall time, prefix cache / last prompt only: {rows[1][1]['seconds'] / rows[0][1]['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
