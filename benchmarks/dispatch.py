"""Aten operators dispatched per decode step: the kernel-launch count a CPU can measure.

    python -m benchmarks.dispatch                         # embedded SmolLM2-135M, N = 1, 2, 4, 8
    python -m benchmarks.dispatch --config tiny --workers 2 --compile

On a GPU nearly every aten operator is at least one kernel launch, and a decode step of a small batch
is bound by launches, not by arithmetic. This counts, with a `TorchDispatchMode`, the operators one
decode forward dispatches (every row feeding one token) for:
- `transformers SDPA`: the model's own decode of N sequences over a `DynamicCache` (same model, batch N);
- `hogwild fast`: the engine's eager fast path over N workers' views;
- `hogwild static`: the static decode step run eagerly (`static_step.py`, before compilation);
- `hogwild compiled` (with `--compile`): the static step compiled; on a CPU only the calls into
  external kernels (matmuls) still go through the dispatcher; on CUDA the step is one graph replay.
Reported per step and per layer (the step's count / layers).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.baselines import DecodeBaseline, prefill, synchronize
from benchmarks.models import CONFIGS, load_engine, prompt_ids
from benchmarks.report import print_rows
from hogwild_agents import HogwildEngine, attention
from hogwild_agents.loading import resolve_device, resolve_dtype
from hogwild_agents.plan import ForwardPlan
from hogwild_agents.static_step import StaticDecodeStep


class OpCounter(TorchDispatchMode):
    """Counts every aten operator dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


class ProfiledCounter:
    """Counts, with the profiler, the top-level aten operators run while active and (CUDA) the kernel
    launches, graph replays included. Works under torch.compile, where dispatch modes cannot."""

    LAUNCHES = (
        "cudaLaunchKernel",
        "cudaLaunchKernelExC",
        "cuLaunchKernel",
        "cuLaunchKernelEx",
        "cudaGraphLaunch",
    )

    def __init__(self, device: torch.device) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        self._profile = profile(activities=activities)
        self.ops: Counter[str] = Counter()
        self.launches = 0

    def __enter__(self) -> ProfiledCounter:
        self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._profile.__exit__(*exc)
        for event in self._profile.events():
            if event.name in self.LAUNCHES:
                self.launches += 1
            elif event.name.startswith("aten::") and not _inside_aten(event):
                self.ops[event.name.removeprefix("aten::")] += 1


def _inside_aten(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


Counting = Callable[[], Any]  # makes a counter: a context manager with `.ops` (and maybe `.launches`)


def hogwild_forward(engine: HogwildEngine, ids: list[int], n: int, counting: Counting, steps: int = 3) -> Any:
    """Count the decode forward of the last of `steps` steps of a run of N workers (the steps before
    it warm up: the prompt, and a compiled step's compilation)."""
    run = engine.start(ids, n_workers=n, max_new_tokens=steps + 4)
    counter = counting()
    plain = engine.forward

    def counted(plan: ForwardPlan, attend: attention.AttentionFn) -> torch.Tensor:
        if not plan.single_tokens:
            return plain(plan, attend)
        with counter:
            out = plain(plan, attend)
            synchronize(engine.device)
            return out

    try:
        for _ in range(steps - 1):
            run.step()
        engine.forward = counted
        run.step()
    finally:
        engine.forward = plain
        run.close()
    return counter


def sdpa_forward(engine: HogwildEngine, ids: list[int], n: int, counting: Counting) -> Any:
    """Count one transformers decode step of N sequences over a DynamicCache."""
    decode = DecodeBaseline(engine.model, prefill(engine.model, ids[:-1]), ids[-1], n)
    decode.steps(1)
    counter = counting()
    with counter:
        decode.steps(1)
    return counter


def measure(engine: HogwildEngine, ids: list[int], workers: Sequence[int], compile: bool) -> dict[str, Any]:
    """Per N and path: operators per decode step (and, on CUDA, kernel launches)."""
    device = engine.device
    static = HogwildEngine(engine.model, engine.tokenizer)
    static.decode_step = StaticDecodeStep(engine.model)
    paths: dict[str, Callable[[int, Counting], Any]] = {
        "transformers_sdpa": lambda n, c: sdpa_forward(engine, ids, n, c),
        "hogwild_fast": lambda n, c: hogwild_forward(engine, ids, n, c),
        "hogwild_static": lambda n, c: hogwild_forward(static, ids, n, c),
    }
    if compile:
        compiled = HogwildEngine(engine.model, engine.tokenizer, compile=True)
        paths["hogwild_compiled"] = lambda n, c: hogwild_forward(compiled, ids, n, c)
    rows = []
    for n in workers:
        row: dict[str, Any] = dict(workers=n)
        for name, forward in paths.items():
            # dispatch modes do not run under torch.compile: the compiled step is counted by the profiler
            counter = forward(n, lambda: ProfiledCounter(device)) if name == "hogwild_compiled" else None
            if counter is None:
                counter = forward(n, OpCounter)
            total = sum(counter.ops.values())
            row[name] = dict(
                ops=total,
                ops_per_layer=total / engine.n_layers,
                by_name=dict(counter.ops.most_common()),
                counted_by="profiler" if isinstance(counter, ProfiledCounter) else "dispatch mode",
            )
            if device.type == "cuda":
                row[name]["launches"] = forward(n, lambda: ProfiledCounter(device)).launches
        sdpa = row["transformers_sdpa"]["ops"]
        for name in paths:
            row[name]["vs_sdpa"] = row[name]["ops"] / sdpa
        rows.append(row)
    return dict(layers=engine.n_layers, device=str(device), paths=list(paths), rows=rows)


def print_report(results: dict[str, Any]) -> None:
    paths, cuda = results["paths"], results["device"].startswith("cuda")
    header = ("N", *(f"{p}: per step / per layer (x SDPA)" for p in paths))
    if cuda:
        header += tuple(f"{p}: launches" for p in paths)
    rows = []
    for r in results["rows"]:
        cells = [str(r["workers"])]
        cells += [f"{r[p]['ops']:,} / {r[p]['ops_per_layer']:.1f} ({r[p]['vs_sdpa']:.2f})" for p in paths]
        if cuda:
            cells += [f"{r[p]['launches']:,}" for p in paths]
        rows.append(tuple(cells))
    title = f"Aten operators dispatched per decode step ({results['layers']} layers, {results['device']})"
    print_rows(title, header, rows)
    if "hogwild_compiled" in paths:
        print("hogwild_compiled: top-level aten operators the compiled step still runs (profiler)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dispatch", description=__doc__)
    parser.add_argument("--model", help="model path, id or .gguf file (default: the embedded SmolLM2-135M)")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="random weights with this architecture")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--workers", default="1,2,4,8", help="comma-separated worker counts")
    parser.add_argument("--context", type=int, default=256, help="prompt tokens (counts do not depend on it)")
    parser.add_argument("--compile", action="store_true", help="also count the compiled static step")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    engine = load_engine(args.model, args.config, device, resolve_dtype(args.dtype, device))
    ids = prompt_ids(engine, args.context, vocabulary=args.config is None)
    workers = sorted({int(w) for w in args.workers.split(",") if w.strip()})
    results = measure(engine, ids, workers, args.compile)
    print_report(results)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
