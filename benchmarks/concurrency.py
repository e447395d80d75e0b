"""Benchmark: many runs at once through the engine's scheduler, same model and device, one process.

    python -m benchmarks.concurrency --threads 1                      # embedded SmolLM2-135M, CPU
    python -m benchmarks.concurrency --quick --config tiny            # smoke test (seconds)

Reports, as ratios measured in one run:
1. aggregate generated tokens/s of R concurrent runs (R = 1, 2, 4, 8, 16), for 2-worker and 1-worker
   runs, against the same runs one after another;
2. 8 concurrent 2-worker runs against the same 8 runs in sequence (wall time);
3. 16 concurrent 1-worker runs against transformers `generate` on a batch of 16 (wall time).
Every run decodes `--new-tokens` tokens per worker (end-of-sequence tokens are ignored) after a prompt
of `--prompt-tokens` tokens; the prompt cache is cleared before each measurement, so every run and the
batch baseline encode their whole prompt.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks.baselines import synchronize
from benchmarks.models import CONFIGS, load_engine, prompt_ids
from hogwild_agents import HogwildEngine
from hogwild_agents.loading import resolve_device, resolve_dtype


def run_many(engine: HogwildEngine, prompts: list[list[int]], workers: int, new_tokens: int) -> float:
    """Seconds for every prompt's run, all submitted at once."""
    engine.prompt_cache.clear()
    start = time.perf_counter()
    handles = [engine.submit(p, n_workers=workers, max_new_tokens=new_tokens) for p in prompts]
    for handle in handles:
        handle.result()
    synchronize(engine.device)
    return time.perf_counter() - start


def run_in_sequence(engine: HogwildEngine, prompts: list[list[int]], workers: int, new_tokens: int) -> float:
    """Seconds for the same runs one after another."""
    total = 0.0
    for prompt in prompts:
        total += run_many(engine, [prompt], workers, new_tokens)
    return total


def generate_batch(engine: HogwildEngine, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for transformers `generate` on the prompts as one batch (greedy, exactly `new_tokens`)."""
    ids = torch.tensor(prompts, device=engine.device)
    start = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
        )
    synchronize(engine.device)
    return time.perf_counter() - start


def best(measure: Any, repeats: int) -> float:
    """The median of `repeats` timings (the machine is shared; the median resists one slow repeat)."""
    return statistics.median(measure() for _ in range(repeats))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = resolve_device(args.device), None
    dtype = resolve_dtype(args.dtype, device)
    engine = load_engine(args.model, args.config, device, dtype)
    base = prompt_ids(engine, args.prompt_tokens, vocabulary=args.config is None)
    prompts = [[*base[:-1], base[-1] + i] for i in range(max(args.runs))]  # distinct last tokens
    new = args.new_tokens
    run_many(engine, prompts[:2], 2, 4)  # warm up
    curve = []
    for workers in (2, 1):
        for r in args.runs:
            together = best(lambda r=r, w=workers: run_many(engine, prompts[:r], w, new), args.repeats)
            alone = best(lambda r=r, w=workers: run_in_sequence(engine, prompts[:r], w, new), args.repeats)
            tokens = r * workers * new
            curve.append(
                dict(
                    workers=workers,
                    runs=r,
                    concurrent_s=together,
                    sequential_s=alone,
                    concurrent_tokens_per_s=tokens / together,
                    sequential_tokens_per_s=tokens / alone,
                    speedup=alone / together,
                )
            )
    eight = next(c for c in curve if c["workers"] == 2 and c["runs"] == 8) if 8 in args.runs else None
    sixteen = next((c for c in curve if c["workers"] == 1 and c["runs"] == 16), None)
    batch = None
    if sixteen is not None:
        generate_s = best(lambda: generate_batch(engine, prompts[:16], new), args.repeats)
        batch = dict(
            runs=16,
            concurrent_s=sixteen["concurrent_s"],
            generate_batch_s=generate_s,
            ratio=sixteen["concurrent_s"] / generate_s,
        )
    return {
        "setup": {
            "model": args.config or args.model or "SmolLM2-135M-Instruct (embedded)",
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": new,
            "repeats": args.repeats,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "curve": curve,
        "eight_two_worker_runs": None
        if eight is None
        else dict(
            concurrent_s=eight["concurrent_s"],
            sequential_s=eight["sequential_s"],
            ratio=eight["concurrent_s"] / eight["sequential_s"],
        ),
        "sixteen_vs_generate_batch": batch,
    }


def report(results: dict[str, Any]) -> str:
    s = results["setup"]
    lines = [
        f"{s['model']} on {s['device']} ({s['dtype']}, {s['threads']} threads), prompt {s['prompt_tokens']} "
        f"tokens, {s['new_tokens']} new tokens per worker, median of {s['repeats']}",
        "",
        "| workers per run | concurrent runs | aggregate tokens/s | same runs in sequence | speed-up |",
        "|---|---|---|---|---|",
    ]
    for c in results["curve"]:
        lines.append(
            f"| {c['workers']} | {c['runs']} | {c['concurrent_tokens_per_s']:.1f} | "
            f"{c['sequential_tokens_per_s']:.1f} | {c['speedup']:.2f}x |"
        )
    if (e := results["eight_two_worker_runs"]) is not None:
        lines.append(
            f"\n8 concurrent 2-worker runs / the same runs in sequence: {e['ratio']:.2f} (wall time)"
        )
    if (b := results["sixteen_vs_generate_batch"]) is not None:
        lines.append(f"16 concurrent 1-worker runs / transformers generate, batch 16: {b['ratio']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model path/id/.gguf (default: the embedded model)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default=None, help="random weights of a shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--runs", default="1,2,4,8,16", help="concurrent run counts")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1,2,4 runs, 8 tokens, 1 repeat")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.runs = [int(r) for r in args.runs.split(",")]
    if args.quick:
        args.runs, args.new_tokens, args.repeats, args.prompt_tokens = [1, 2, 4], 8, 1, 32
    results = measure(args)
    print(report(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
