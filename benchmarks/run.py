"""Benchmark: N shared-cache workers against transformers baselines, same model and device, one run.

    python -m benchmarks.run                        # embedded SmolLM2-135M, CPU, context 1024
    python -m benchmarks.run --quick --config tiny  # smoke test (seconds)
    python -m benchmarks.run --device cuda --config qwen2.5-7b --context 8192 --workers 1,2,4,8

Reports, as ratios:
1. step latency of N workers vs the per-token step of batched decoding of N independent sequences
   (a DynamicCache holding N sequences of the context length) and vs real `generate` with N sequences;
2. total tokens/s of N workers vs single-stream `generate` (batch 1);
3. tokens processed so that N workers see each other every K tokens: the shared cache vs message
   passing (every K tokens each agent re-prefills the others' new tokens), with wall times;
4. KV-cache bytes vs tokens stored;
5. with a bandwidth (default on CUDA: H100 SXM, 3.35e12 B/s): the memory-bandwidth bound of a step,
   (weight bytes + KV bytes read) / bandwidth.
Every worker attends to the whole prompt (`--context` tokens of repeated text). End-of-sequence tokens
are ignored so that every stream decodes the same number of tokens.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks import report
from benchmarks.baselines import (
    DecodeBaseline,
    generate_step_times,
    message_passing,
    prefill,
    synchronize,
)
from benchmarks.models import CONFIGS, load_engine, prompt_ids
from hogwild_agents import HogwildEngine, HogwildRun
from hogwild_agents.attention import IMPLEMENTATIONS
from hogwild_agents.loading import resolve_device, resolve_dtype

H100_BANDWIDTH = 3.35e12  # B/s, H100 SXM HBM3


@dataclass
class Settings:
    model: str | None
    config: str | None
    device: torch.device
    dtype: torch.dtype
    workers: list[int]
    context: int
    steps: int
    warmup: int
    repeats: int
    sync_every: int
    rounds: int
    layout: str
    bandwidth: float | None
    threads: int | None
    attention: str = "fast"


class HogwildBench:
    """A run of N workers over the prompt, stepped and timed."""

    def __init__(
        self, engine: HogwildEngine, ids: list[int], n: int, max_new: int, layout: str, attention: str
    ) -> None:
        self.engine = engine
        self.run: HogwildRun = engine.start(
            ids, n_workers=n, layout=layout, max_new_tokens=max_new, attention=attention
        )

    def steps(self, count: int) -> list[float]:
        """Run `count` lockstep steps; return each step's seconds."""
        times = []
        for _ in range(count):
            start = time.perf_counter()
            self.run.step()
            synchronize(self.engine.device)
            times.append(time.perf_counter() - start)
        return times


def median_ms(times: Sequence[float]) -> float:
    return 1e3 * statistics.median(times)


def measure(settings: Settings) -> dict[str, Any]:
    """Run every section; return the JSON-ready results."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    engine = load_engine(settings.model, settings.config, settings.device, settings.dtype)
    model = engine.model
    ids = prompt_ids(engine, settings.context, vocabulary=settings.config is None)
    prompt = prefill(model, ids[:-1])  # the baselines' shared starting point
    bytes_per_token = 2 * engine.n_layers * engine.kv_heads * engine.head_dim * _element_size(engine.dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    new_tokens = settings.warmup + settings.repeats * settings.steps
    results: dict[str, Any] = {
        "setup": _setup(settings, engine, weight_bytes, bytes_per_token),
        "latency": [],
        "throughput": [],
        "message_passing": [],
        "kv_cache": [],
        "bandwidth": [],
    }

    for n in settings.workers:
        hog = HogwildBench(engine, ids, n, new_tokens + 4, settings.layout, settings.attention)
        decode = DecodeBaseline(model, prompt, ids[-1], n)
        hog.steps(settings.warmup)
        decode.steps(settings.warmup)
        hog_times: list[float] = []
        decode_times: list[float] = []
        generate_times: list[float] = []
        single_times: list[float] = []
        for _ in range(settings.repeats):  # interleaved, so that all see the same machine load
            hog_times += hog.steps(settings.steps)
            decode_times += decode.steps(settings.steps)
            generate_times += generate_step_times(model, prompt, ids, n, settings.steps)
            single_times += generate_step_times(model, prompt, ids, 1, settings.steps) if n > 1 else []
        hog_ms, decode_ms, generate_ms = map(median_ms, (hog_times, decode_times, generate_times))
        single_ms = median_ms(single_times) if n > 1 else generate_ms
        results["latency"].append(
            dict(
                workers=n,
                hogwild_ms=hog_ms,
                decode_ms=decode_ms,
                generate_ms=generate_ms,
                vs_decode=hog_ms / decode_ms,
                vs_generate=hog_ms / generate_ms,
            )
        )
        results["throughput"].append(
            dict(
                workers=n,
                hogwild_tokens_per_s=1e3 * n / hog_ms,
                single_stream_tokens_per_s=1e3 / single_ms,
                ratio=n * single_ms / hog_ms,
            )
        )
        cache = hog.run.cache
        results["kv_cache"].append(
            dict(
                workers=n,
                tokens_stored=cache.tokens_stored,
                bytes_per_token=cache.shape.bytes_per_token,
                bytes_used=cache.bytes_used,
                bytes_allocated=cache.bytes_allocated,
                baseline_tokens=n * decode.sequence_length,
                baseline_bytes=decode.kv_bytes,
                baseline_vs_hogwild=decode.kv_bytes / cache.bytes_used,
            )
        )
        if settings.bandwidth:
            hog_bound = (weight_bytes + cache.bytes_used) / settings.bandwidth
            decode_bound = (weight_bytes + decode.kv_bytes) / settings.bandwidth
            results["bandwidth"].append(
                dict(
                    workers=n,
                    hogwild_bytes_read=weight_bytes + cache.bytes_used,
                    hogwild_bound_ms=1e3 * hog_bound,
                    hogwild_vs_bound=hog_ms / (1e3 * hog_bound),
                    decode_bytes_read=weight_bytes + decode.kv_bytes,
                    decode_bound_ms=1e3 * decode_bound,
                    decode_vs_bound=decode_ms / (1e3 * decode_bound),
                )
            )
        del hog, decode
        _free(settings.device)

    for n in (n for n in settings.workers if n > 1):
        results["message_passing"].append(_collaboration(engine, prompt, ids, n, settings))
        _free(settings.device)
    results["targets"] = _targets(results)
    return results


def _collaboration(
    engine: HogwildEngine, prompt: Any, ids: list[int], n: int, settings: Settings
) -> dict[str, Any]:
    """N workers that see each other every K tokens: shared cache vs message passing."""
    total = settings.sync_every * settings.rounds
    hog = HogwildBench(engine, ids, n, total + 4, settings.layout, settings.attention)
    run = hog.run
    forward_before, stored_before = run.forward_tokens, run.cache.tokens_stored
    wall = sum(hog.steps(total + 1))  # the first step feeds nothing: the prompt is encoded
    processed = run.forward_tokens - forward_before
    stored = run.cache.tokens_stored - stored_before
    mp = message_passing(engine.model, prompt, ids[-1], n, settings.sync_every, settings.rounds)
    hogwild = dict(
        processed_tokens=processed,
        re_encoded_tokens=processed - stored,
        kv_tokens=run.cache.tokens_stored,
        wall_s=wall,
    )
    return dict(
        workers=n,
        sync_every=settings.sync_every,
        tokens_per_worker=total,
        hogwild=hogwild,
        message_passing=asdict(mp),
        tokens_ratio=mp.processed_tokens / processed,
        time_ratio=mp.wall_s / wall,
    )


def _targets(results: dict[str, Any]) -> dict[str, Any]:
    """The speed targets at N=4, when N=4 was measured."""
    latency = {row["workers"]: row for row in results["latency"]}
    throughput = {row["workers"]: row for row in results["throughput"]}
    if 4 not in latency:
        return {}
    return dict(
        latency_vs_decode_n4=dict(value=latency[4]["vs_decode"], target="<= 1.3"),
        throughput_vs_single_n4=dict(value=throughput[4]["ratio"], target=">= 2.5"),
    )


def _setup(settings: Settings, engine: HogwildEngine, weight_bytes: int, bytes_per_token: int) -> dict:
    fields = asdict(settings)
    fields["device"] = str(settings.device)
    fields["dtype"] = str(settings.dtype).removeprefix("torch.")
    fields["model"] = settings.model or (None if settings.config else "embedded SmolLM2-135M-Instruct")
    fields.update(
        layers=engine.n_layers,
        kv_heads=engine.kv_heads,
        head_dim=engine.head_dim,
        weight_bytes=weight_bytes,
        kv_bytes_per_token=bytes_per_token,
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        gpu=torch.cuda.get_device_name(settings.device) if settings.device.type == "cuda" else None,
    )
    return fields


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: Sequence[str] | None = None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="model path, id or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="random weights with this architecture")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument(
        "--workers", default="1,2,4,8", help="comma-separated worker counts (default 1,2,4,8)"
    )
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens every stream attends to")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=3, help="timed blocks, interleaved with the baseline")
    parser.add_argument("--sync-every", type=int, default=32, help="K: tokens between message-passing syncs")
    parser.add_argument("--rounds", type=int, default=3, help="message-passing rounds of K tokens")
    parser.add_argument("--layout", default="combined", help="cache layout of the workers")
    parser.add_argument(
        "--bandwidth", type=float, help="memory bandwidth in B/s for the bound (default on CUDA: 3.35e12)"
    )
    parser.add_argument(
        "--attention", default="fast", choices=IMPLEMENTATIONS, help="the workers' attention (triton: CUDA)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    if not workers or min(workers) < 1:
        parser.error("--workers needs positive worker counts, e.g. 1,2,4,8")
    settings = Settings(
        model=args.model,
        config=args.config,
        device=device,
        dtype=resolve_dtype(args.dtype, device),
        workers=workers,
        context=args.context,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        sync_every=args.sync_every,
        rounds=args.rounds,
        layout=args.layout,
        bandwidth=args.bandwidth or (H100_BANDWIDTH if device.type == "cuda" else None),
        threads=args.threads,
        attention=args.attention,
    )
    if args.quick:
        settings.workers = [w for w in workers if w <= 2] or [1]
        settings.context, settings.steps, settings.warmup, settings.repeats = 48, 3, 1, 1
        settings.sync_every, settings.rounds = 4, 2
    if settings.context < 2:
        parser.error("--context must be at least 2 tokens")
    return settings, args.json


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    settings, json_path = parse_args(argv)
    results = measure(settings)
    report.print_tables(results)
    if json_path is not None:
        json_path.write_text(json.dumps(results, indent=2))
        print(f"results written to {json_path}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
