"""Load benchmark of `hogwild serve`: many streaming requests from the openai client over loopback.

    python -m benchmarks.serve_load                            # embedded SmolLM2-135M, 32 requests
    python -m benchmarks.serve_load --config smollm2-135m      # its shapes, random weights (fixed lengths)
    python -m benchmarks.serve_load --quick                    # smoke test: tiny model, 4 requests

The server runs in this process (uvicorn in a thread) over one engine. `--requests` streaming requests
(distinct prompts, greedy, `stream_options.include_usage`) are sent all at once, then the same requests
one after another. Reported, for both: aggregate completion tokens/s (usage over all workers, per wall
second), p50/p95 time to first token (the first reasoning or content delta), and whether every request
completed (a finish reason and the usage chunk) with the same text in both passes (greedy runs: the text
does not depend on which runs share a forward, up to floating-point ties).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai
import torch
from transformers import AutoModelForCausalLM

from benchmarks.models import config_for
from hogwild_agents import HogwildEngine
from hogwild_agents.loading import load_model_and_tokenizer
from hogwild_agents.server import ServerConfig, create_app
from hogwild_agents.server.background import BackgroundServer

MODEL_NAME = "bench"


@dataclass
class Reply:
    """One streamed request, as the client saw it."""

    ttft_s: float | None = None
    total_s: float = 0.0
    content: str = ""
    reasoning: dict[int, str] = field(default_factory=dict)
    finish_reason: str | None = None
    completion_tokens: int | None = None

    @property
    def complete(self) -> bool:
        return self.finish_reason is not None and self.completion_tokens is not None

    @property
    def text(self) -> tuple[str, tuple[str, ...]]:
        return self.content, tuple(self.reasoning[w] for w in sorted(self.reasoning))


def build_engine(model: str | None, config: str | None) -> HogwildEngine:
    """The embedded model (or `model`), or `config`'s shapes with random weights and the embedded model's
    tokenizer (so chat templates and protocols work); random weights never end a run early."""
    loaded, tokenizer = load_model_and_tokenizer(model, device="cpu", dtype="float32")
    if config is None:
        return HogwildEngine(loaded, tokenizer)
    settings = config_for(config)
    settings.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    random = AutoModelForCausalLM.from_config(settings, dtype=torch.float32).eval()
    engine = HogwildEngine(random, tokenizer)
    engine.eos_token_ids = frozenset()
    return engine


async def stream_one(client: openai.AsyncOpenAI, prompt: str, seed: int) -> Reply:
    reply = Reply()
    start = time.perf_counter()
    chunks = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
        seed=seed,
    )
    async for chunk in chunks:
        if chunk.usage is not None:
            reply.completion_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta, extra = choice.delta, choice.delta.model_extra or {}
        if reply.ttft_s is None and (delta.content or extra.get("reasoning_content")):
            reply.ttft_s = time.perf_counter() - start
        reply.content += delta.content or ""
        if extra.get("reasoning_content"):
            worker = extra["hogwild_worker"]["index"]
            reply.reasoning[worker] = reply.reasoning.get(worker, "") + extra["reasoning_content"]
        reply.finish_reason = choice.finish_reason or reply.finish_reason
    reply.total_s = time.perf_counter() - start
    return reply


async def load(url: str, prompts: list[str], concurrent: bool) -> tuple[float, list[Reply]]:
    """Wall seconds and replies of every prompt's request, sent at once or one after another."""
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=3600
    ) as client:
        start = time.perf_counter()
        if concurrent:
            replies = await asyncio.gather(*(stream_one(client, p, i) for i, p in enumerate(prompts)))
        else:
            replies = [await stream_one(client, p, i) for i, p in enumerate(prompts)]
        return time.perf_counter() - start, list(replies)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(wall_s: float, replies: list[Reply]) -> dict[str, Any]:
    tokens = sum(r.completion_tokens or 0 for r in replies)
    ttfts = [r.ttft_s for r in replies if r.ttft_s is not None]
    return {
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall_s,
        "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
        "ttft_p95_s": percentile(ttfts, 0.95) if ttfts else None,
        "completed": sum(r.complete for r in replies),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = build_engine(args.model, args.config)
    config = ServerConfig(
        model_name=MODEL_NAME,
        n_workers=args.workers,
        protocol=None if args.protocol == "none" else args.protocol,
        max_tokens=args.max_tokens,
        temperature=0.0,
    )
    prompts = [f"Question {i}: what is {i + 2} times {i + 5}? Explain briefly." for i in range(args.requests)]
    with BackgroundServer(create_app(engine, config)) as server:
        asyncio.run(load(server.url, prompts[:1], concurrent=False))  # warm up
        concurrent_s, together = asyncio.run(load(server.url, prompts, concurrent=True))
        sequential_s, alone = asyncio.run(load(server.url, prompts, concurrent=False))
    concurrent, sequential = summary(concurrent_s, together), summary(sequential_s, alone)
    return {
        "setup": {
            "model": f"{args.config} (random weights)"
            if args.config
            else args.model or "SmolLM2-135M-Instruct",
            "requests": args.requests,
            "workers": args.workers,
            "protocol": args.protocol,
            "max_tokens": args.max_tokens,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "concurrent": concurrent,
        "sequential": sequential,
        "throughput_ratio": concurrent["tokens_per_s"] / sequential["tokens_per_s"],
        "all_complete": concurrent["completed"] == sequential["completed"] == args.requests,
        "same_text": sum(a.text == b.text for a, b in zip(together, alone, strict=True)),
        "replies": {"concurrent": [asdict(r) for r in together], "sequential": [asdict(r) for r in alone]},
    }


def report(results: dict[str, Any]) -> str:
    s, c, q = results["setup"], results["concurrent"], results["sequential"]
    lines = [
        f"{s['model']}, {s['requests']} streaming requests, {s['workers']} workers, "
        f"protocol {s['protocol']}, {s['max_tokens']} tokens per worker, {s['threads']} torch threads",
        "",
        "| requests | wall s | completion tokens | tokens/s | TTFT p50 s | TTFT p95 s | completed |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in (("concurrent", c), ("sequential", q)):
        lines.append(
            f"| {s['requests']} {name} | {row['wall_s']:.1f} | {row['completion_tokens']} | "
            f"{row['tokens_per_s']:.1f} | {row['ttft_p50_s']:.2f} | {row['ttft_p95_s']:.2f} | "
            f"{row['completed']}/{s['requests']} |"
        )
    lines.append(
        f"\naggregate tokens/s, concurrent / sequential: {results['throughput_ratio']:.2f}x; "
        f"same text in both passes: {results['same_text']}/{s['requests']}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model path/id/.gguf (default: the embedded model)")
    parser.add_argument("--config", default=None, help="random weights of this shape (benchmarks.models)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="workers per request")
    parser.add_argument("--protocol", default="collaborate", help="a shipped protocol or 'none'")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per worker")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: tiny random model, 4 requests, 4 tokens"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.requests, args.max_tokens = args.config or "tiny", 4, 4
    results = measure(args)
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
