"""Benchmark: N shared-cache workers against transformers baselines, same model and device, one run.

    python -m benchmarks.run                        # embedded SmolLM2-135M, CPU, context 1024
    python -m benchmarks.run --quick --config tiny  # smoke test (seconds)
    python -m benchmarks.run --device cuda --config qwen2.5-7b --context 8192 --workers 1,2,4,8 --compile

Reports, as ratios:
1. step latency of N workers vs the per-token step of batched decoding of N independent sequences
   (transformers with a DynamicCache, and with a StaticCache) and vs real `generate` with N sequences;
   with `--compile`, also the compiled static decode step (`HogwildEngine(compile=True)`) against the
   eager step and against the compiled StaticCache decode;
2. total tokens/s of N workers vs single-stream `generate` (batch 1), beside the same ratio for
   batched decode of N independent sequences (what batching alone gives);
3. tokens the model embeds so that N workers see each other every K tokens (counted by a hook on the
   input embeddings): the shared cache vs message passing (every K tokens each agent re-prefills the
   others' new tokens), with wall times;
4. KV-cache bytes: used (tokens stored) and allocated (pages held; the pool's storage), vs the baselines';
5. with a bandwidth (default on CUDA: H100 SXM, 3.35e12 B/s): the memory-bandwidth bound of a step,
   (weight bytes + KV bytes read) / bandwidth;
6. with `--attention-context C`: one layer's attention over N workers' views of C tokens against SDPA
   over N sequences of C tokens.
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
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from benchmarks import report
from benchmarks.baselines import (
    DecodeBaseline,
    EmbeddedTokens,
    StaticDecodeBaseline,
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
    compile: bool = False
    attention_context: int | None = None


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
    compiled = compiled_engine(engine) if settings.compile else None
    model = engine.model
    ids = prompt_ids(engine, settings.context, vocabulary=settings.config is None)
    prompt = prefill(model, ids[:-1])  # the baselines' shared starting point
    bytes_per_token = 2 * engine.n_layers * engine.kv_heads * engine.head_dim * _element_size(engine.dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    new_tokens = settings.warmup + settings.repeats * settings.steps
    static_len = settings.context + new_tokens + 1  # the StaticCache holds every token it decodes
    results: dict[str, Any] = {
        "setup": _setup(settings, engine, weight_bytes, bytes_per_token),
        "latency": [],
        "compiled": [],
        "throughput": [],
        "message_passing": [],
        "kv_cache": [],
        "bandwidth": [],
        "attention": [],
    }

    for n in settings.workers:
        hog = HogwildBench(engine, ids, n, new_tokens + 4, settings.layout, settings.attention)
        hog_c = HogwildBench(compiled, ids, n, new_tokens + 4, settings.layout, "fast") if compiled else None
        decode = DecodeBaseline(model, prompt, ids[-1], n)
        static = StaticDecodeBaseline(model, prompt, ids[-1], n, static_len)
        static_c = (
            StaticDecodeBaseline(model, prompt, ids[-1], n, static_len, compile=True) if compiled else None
        )
        timed = {"hogwild": hog, "decode": decode, "static": static, "hogwild_c": hog_c, "static_c": static_c}
        timed = {name: bench for name, bench in timed.items() if bench is not None}
        for bench in timed.values():  # the compiled ones compile here
            bench.steps(settings.warmup)
        times: dict[str, list[float]] = {name: [] for name in (*timed, "generate", "single")}
        for _ in range(settings.repeats):  # interleaved, so that all see the same machine load
            for name, bench in timed.items():
                times[name] += bench.steps(settings.steps)
            times["generate"] += generate_step_times(model, prompt, ids, n, settings.steps)
            times["single"] += generate_step_times(model, prompt, ids, 1, settings.steps) if n > 1 else []
        ms = {name: median_ms(t) for name, t in times.items() if t}
        ms.setdefault("single", ms["generate"])
        results["latency"].append(
            dict(
                workers=n,
                hogwild_ms=ms["hogwild"],
                decode_ms=ms["decode"],
                static_decode_ms=ms["static"],
                generate_ms=ms["generate"],
                vs_decode=ms["hogwild"] / ms["decode"],
                vs_static_decode=ms["hogwild"] / ms["static"],
                vs_generate=ms["hogwild"] / ms["generate"],
            )
        )
        if hog_c is not None:
            results["compiled"].append(
                dict(
                    workers=n,
                    hogwild_compiled_ms=ms["hogwild_c"],
                    hogwild_eager_ms=ms["hogwild"],
                    static_decode_compiled_ms=ms["static_c"],
                    compiled_vs_eager=ms["hogwild_c"] / ms["hogwild"],
                    vs_static_decode_compiled=ms["hogwild_c"] / ms["static_c"],
                    buckets=[
                        dict(asdict(shape), pool_pages=pages)
                        for shape, pages in sorted(compiled.decode_step.buckets_used, key=_bucket_key)
                    ],
                )
            )
        results["throughput"].append(
            dict(
                workers=n,
                hogwild_tokens_per_s=1e3 * n / ms["hogwild"],
                single_stream_tokens_per_s=1e3 / ms["single"],
                ratio=n * ms["single"] / ms["hogwild"],
                decode_tokens_per_s=1e3 * n / ms["decode"],
                decode_ratio=n * ms["single"] / ms["decode"],  # what batching N sequences gives alone
                compiled_ratio=n * ms["single"] / ms["hogwild_c"] if hog_c else None,
            )
        )
        cache, pool = hog.run.cache, hog.run.pool
        results["kv_cache"].append(
            dict(
                workers=n,
                tokens_stored=cache.tokens_stored,
                bytes_per_token=cache.shape.bytes_per_token,
                bytes_used=cache.bytes_used,
                bytes_allocated=cache.bytes_allocated,
                pool_bytes_allocated=pool.bytes_allocated,
                baseline_tokens=n * decode.sequence_length,
                baseline_bytes=decode.kv_bytes,
                baseline_vs_used=decode.kv_bytes / cache.bytes_used,
                baseline_vs_allocated=decode.kv_bytes / cache.bytes_allocated,
                static_baseline_bytes=static.kv_bytes,
            )
        )
        if settings.bandwidth:
            results["bandwidth"].append(
                _bandwidth(n, settings.bandwidth, weight_bytes, cache.bytes_used, decode.kv_bytes, ms)
            )
        del hog, hog_c, decode, static, static_c, timed
        _free(settings.device)

    for n in (n for n in settings.workers if n > 1):
        results["message_passing"].append(_collaboration(engine, prompt, ids, n, settings))
        _free(settings.device)
    if settings.attention_context:
        from benchmarks import attention

        results["attention"] = attention.measure(
            engine.attention.layers[0],
            settings.attention_context,
            settings.workers,
            device=settings.device,
            dtype=settings.dtype,
            own=min(attention.OWN_TOKENS, settings.attention_context),
            compile=settings.compile,
            repeats=settings.repeats * settings.steps,
        )
    results["targets"] = _targets(results)
    return results


def _bucket_key(bucket: tuple[Any, int]) -> tuple[int, ...]:
    shape, pages = bucket
    return (*astuple(shape), pages)


def compiled_engine(engine: HogwildEngine) -> HogwildEngine:
    """An engine over the same model with `compile=True` (end-of-sequence ignored, as in `load_engine`)."""
    compiled = HogwildEngine(engine.model, engine.tokenizer, compile=True)
    compiled.eos_token_ids = frozenset()
    return compiled


def _bandwidth(
    n: int, bandwidth: float, weight_bytes: int, hog_kv: int, decode_kv: int, ms: dict[str, float]
) -> dict[str, Any]:
    """Each step's bound: (weights + KV read) / bandwidth, against the measured step times."""
    hog_bound = 1e3 * (weight_bytes + hog_kv) / bandwidth
    decode_bound = 1e3 * (weight_bytes + decode_kv) / bandwidth
    return dict(
        workers=n,
        hogwild_bytes_read=weight_bytes + hog_kv,
        hogwild_bound_ms=hog_bound,
        hogwild_vs_bound=ms["hogwild"] / hog_bound,
        hogwild_compiled_vs_bound=ms["hogwild_c"] / hog_bound if "hogwild_c" in ms else None,
        decode_bytes_read=weight_bytes + decode_kv,
        decode_bound_ms=decode_bound,
        decode_vs_bound=ms["decode"] / decode_bound,
    )


def _collaboration(
    engine: HogwildEngine, prompt: Any, ids: list[int], n: int, settings: Settings
) -> dict[str, Any]:
    """N workers that see each other every K tokens: shared cache vs message passing. Tokens processed
    are the tokens the model embeds (a hook on the input embeddings), on both sides."""
    total = settings.sync_every * settings.rounds
    hog = HogwildBench(engine, ids, n, total + 4, settings.layout, settings.attention)
    run = hog.run
    fed_before = sum(len(w.stream) - len(w.pending) for w in run.workers)
    with EmbeddedTokens(engine.model) as embedded:
        wall = sum(hog.steps(total + 1))  # the first step feeds nothing: the prompt is encoded
    fed = sum(len(w.stream) - len(w.pending) for w in run.workers) - fed_before  # tokens written once
    mp = message_passing(engine.model, prompt, ids[-1], n, settings.sync_every, settings.rounds)
    hogwild = dict(
        processed_tokens=embedded.count,
        own_tokens=fed,
        re_encoded_tokens=embedded.count - fed,
        kv_tokens=run.cache.tokens_stored,
        wall_s=wall,
    )
    return dict(
        workers=n,
        sync_every=settings.sync_every,
        tokens_per_worker=total,
        hogwild=hogwild,
        message_passing=asdict(mp),
        tokens_ratio=mp.processed_tokens / embedded.count,
        time_ratio=mp.wall_s / wall,
    )


def _targets(results: dict[str, Any]) -> dict[str, Any]:
    """The speed targets at N=4, when N=4 was measured (the compiled ones with --compile), and the
    attention ones (with --attention-context)."""
    latency = {row["workers"]: row for row in results["latency"]}
    throughput = {row["workers"]: row for row in results["throughput"]}
    targets: dict[str, Any] = {}
    if 4 in latency:
        targets["latency_vs_decode_n4"] = dict(value=latency[4]["vs_decode"], target="<= 1.3")
        targets["throughput_vs_single_n4"] = dict(value=throughput[4]["ratio"], target=">= 2.5")
    compiled = {row["workers"]: row for row in results["compiled"]}
    for n, row in compiled.items():
        targets[f"compiled_vs_eager_n{n}"] = dict(value=row["compiled_vs_eager"], target="<= 1.0")
    if 4 in compiled:
        targets["compiled_vs_static_decode_compiled_n4"] = dict(
            value=compiled[4]["vs_static_decode_compiled"], target="<= 1.15"
        )
    bandwidth = {row["workers"]: row for row in results["bandwidth"]}
    if 4 in bandwidth and bandwidth[4]["hogwild_compiled_vs_bound"] is not None:
        targets["compiled_vs_bandwidth_bound_n4"] = dict(
            value=bandwidth[4]["hogwild_compiled_vs_bound"], target="<= 1.5"
        )
    if results["attention"]:
        from benchmarks import attention

        device = torch.device(results["setup"]["device"])
        targets.update(attention.targets(results["attention"], device))
    return targets


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
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also time the compiled static decode step (and a compiled StaticCache baseline)",
    )
    parser.add_argument(
        "--attention-context",
        type=int,
        help="also time one layer's attention over views of this many tokens against SDPA",
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
        compile=args.compile,
        attention_context=args.attention_context,
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
