"""Soak test: many mixed ChatHogwild calls at once against ONE model, for a fixed time.

    python -m benchmarks.soak                    # 600 s, tiny random-weight model, embedded tokenizer
    python -m benchmarks.soak --seconds 60       # what CI runs (tests/test_soak.py)
    python -m benchmarks.soak --model embedded   # the embedded SmolLM2-135M-Instruct

8 threads and 8 asyncio tasks (`--threads`, `--tasks`) issue calls drawn at random: plain invoke/ainvoke,
streams read to the end, streams abandoned half-way, cancelled tasks, calls with a short `timeout_s`,
in-engine tools that raise or time out, and structured output. It checks that

1. no call hangs: each one ends within `--call-deadline` seconds;
2. every completed result equals its sequential twin: the same call (same seed) run again alone
   afterwards. A call cut by its timeout, and an abandoned stream, must be a prefix of its twin;
3. the engine is free at the end (`engine.busy`, else its lock can be taken at once);
4. live tensor bytes and the process's RSS return to their baseline after a garbage collection
   (within `--tensor-tolerance-mb` and `--rss-tolerance-mb`; glibc's free lists are trimmed first).

It prints a summary and exits 1 on any failure. The tiny model's random weights never end a stream
early, so every run uses its whole budget.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, Field

from hogwild_agents import HogwildEngine
from hogwild_agents.hooks import EngineTool
from langchain_hogwild import ChatHogwild

PROMPTS = (
    "Write a short poem about the sea.",
    "List three prime numbers and explain why they are prime.",
    "Plan a picnic for four friends.",
)
SEEDS = (0, 1, 2, 3)
KINDS = (
    "invoke",
    "stream",
    "abandoned_stream",
    "cancelled",
    "timeout",
    "tool_raises",
    "tool_times_out",
    "structured",
)
TOOL_CALL = '<tool_call>{"name":"%s","arguments":{}}</tool_call>'  # compact, as the call grammar writes it


class Reading(BaseModel):
    """A reading of an instrument."""

    value: int = Field(description="the reading")
    valid: bool = Field(description="whether it can be trusted")


# ---- the model ----------------------------------------------------------------------------------------


def tiny_engine() -> HogwildEngine:
    """A 2-layer random-weight Llama with the embedded model's tokenizer (as tests/conftest.py builds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from hogwild_agents.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        vocab_size=len(tokenizer),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_theta=10000.0,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.2)
    return HogwildEngine(model.eval(), tokenizer)


class ForceText:
    """A logits processor that makes a worker write `token_ids` once (then lets it sample). Stateless,
    so one instance serves concurrent runs: the next token follows from the stream's end alone."""

    def __init__(self, token_ids: list[int]) -> None:
        self.target = token_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = input_ids[0].tolist() if input_ids.dim() == 2 else input_ids.tolist()
        n = len(self.target)
        if any(ids[i : i + n] == self.target for i in range(max(0, len(ids) - 4 * n), len(ids) - n + 1)):
            return scores  # written already
        written = next((k for k in range(min(n - 1, len(ids)), 0, -1) if ids[-k:] == self.target[:k]), 0)
        forced = torch.full_like(scores, float("-inf"))
        forced[..., self.target[written]] = 0.0
        return forced


def raising_tool() -> str:
    raise RuntimeError("the instrument is broken")


def slow_tool() -> str:
    time.sleep(1.0)
    return "late"


def build_models(engine: HogwildEngine) -> dict[str, Any]:
    """One model per kind of call, all on the one engine."""
    common = dict(engine=engine, temperature=0.8, top_p=0.95)
    raw = ChatHogwild(**common, protocol=None, n_workers=2, max_tokens=8)

    def tool_model(tool: Callable[[], str], name: str, timeout_s: float) -> ChatHogwild:
        forced = ForceText(engine.encode(TOOL_CALL % name))
        return ChatHogwild(
            **common,
            protocol=None,
            n_workers=1,  # a lone worker waits for its tool, so the result lands at a fixed step
            max_tokens=32,
            engine_tools=[EngineTool(name, f"{name} tool", {"type": "object", "properties": {}}, tool)],
            tool_timeout_s=timeout_s,
            logits_processors={0: [forced]},
        )

    return {
        "raw": raw,
        "protocol": ChatHogwild(**common, protocol="collaborate", n_workers=2, max_tokens=8),
        "long": ChatHogwild(**common, protocol=None, n_workers=2, max_tokens=24),
        "tool_raises": tool_model(raising_tool, "inspect", 5.0),
        "tool_times_out": tool_model(slow_tool, "measure", 0.2),
        "structured": ChatHogwild(**common, protocol=None, n_workers=2, max_tokens=24),
    }


# ---- calls --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    kind: str
    prompt: str
    seed: int
    n_workers: int
    cut: int = 0  # chunks read before abandoning a stream; ms before cancelling or timing out

    @property
    def twin_key(self) -> tuple[Any, ...]:
        """Calls with the same key give the same result when run alone."""
        families = {"abandoned_stream": "stream", "timeout": "long", "cancelled": "invoke"}
        return families.get(self.kind, self.kind), self.prompt, self.seed, self.n_workers


@dataclass
class Outcome:
    call: Call
    status: str  # "completed", "partial" (cut short: compared as a prefix), "cancelled"
    signature: tuple[Any, ...] | None = None
    seconds: float = 0.0


def signature(message: Any) -> tuple[Any, ...]:
    """What must be equal between a call and its twin."""
    metadata = message.response_metadata
    calls = tuple((c["name"], json.dumps(c["args"], sort_keys=True)) for c in message.tool_calls)
    texts = tuple(w["text"] for w in metadata.get("workers", ()))
    return message.text, texts, metadata.get("finish_reason"), calls


def options(call: Call) -> dict[str, Any]:
    return {"seed": call.seed, "n_workers": call.n_workers}


def model_for(models: dict[str, Any], call: Call) -> tuple[Any, dict[str, Any]]:
    """The runnable for `call` and its call options."""
    if call.kind == "structured":  # options as settings: the structured-output chain takes no kwargs
        model = models["structured"].model_copy(update={"seed": call.seed, "n_workers": call.n_workers})
        return model.with_structured_output(Reading, method="json_schema", include_raw=True), {}
    if call.kind in ("tool_raises", "tool_times_out"):
        return models[call.kind], {"seed": call.seed}
    model = (
        models["long"] if call.kind in ("timeout", "long") else models["protocol" if call.seed % 2 else "raw"]
    )
    return model, options(call)


def run_sync(models: dict[str, Any], call: Call) -> Outcome:
    model, kwargs = model_for(models, call)
    if call.kind == "structured":
        return Outcome(call, "completed", (model.invoke(call.prompt)["raw"].text,))
    if call.kind in ("stream", "abandoned_stream"):
        full = None
        for chunks, chunk in enumerate(model.stream(call.prompt, **kwargs), start=1):
            full = chunk if full is None else full + chunk
            if call.kind == "abandoned_stream" and chunks >= call.cut:
                return Outcome(call, "partial", (full.text,))  # leaving the loop closes the stream
        return Outcome(call, "completed", signature(full))
    if call.kind == "timeout":
        message = model.invoke(call.prompt, timeout_s=call.cut / 1000, **kwargs)
        return Outcome(call, "partial", signature(message))
    return Outcome(call, "completed", signature(model.invoke(call.prompt, **kwargs)))


async def run_async(models: dict[str, Any], call: Call) -> Outcome:
    model, kwargs = model_for(models, call)
    if call.kind == "structured":
        return Outcome(call, "completed", ((await model.ainvoke(call.prompt))["raw"].text,))
    if call.kind in ("stream", "abandoned_stream"):
        full, chunks = None, 0
        stream = model.astream(call.prompt, **kwargs)
        try:
            async for chunk in stream:
                full = chunk if full is None else full + chunk
                chunks += 1
                if call.kind == "abandoned_stream" and chunks >= call.cut:
                    return Outcome(call, "partial", (full.text,))
        finally:
            await stream.aclose()
        return Outcome(call, "completed", signature(full))
    if call.kind == "cancelled":
        task = asyncio.ensure_future(model.ainvoke(call.prompt, **kwargs))
        await asyncio.sleep(call.cut / 1000)
        task.cancel()
        try:
            return Outcome(call, "completed", signature(await task))  # it finished first
        except asyncio.CancelledError:
            return Outcome(call, "cancelled")
    if call.kind == "timeout":
        message = await model.ainvoke(call.prompt, timeout_s=call.cut / 1000, **kwargs)
        return Outcome(call, "partial", signature(message))
    return Outcome(call, "completed", signature(await model.ainvoke(call.prompt, **kwargs)))


def draw(rng: random.Random, is_async: bool) -> Call:
    kinds = [k for k in KINDS if is_async or k != "cancelled"]
    kind = rng.choice(kinds)
    cut = {
        "abandoned_stream": rng.randint(1, 4),
        "cancelled": rng.randint(0, 60),
        "timeout": rng.randint(20, 150),
    }
    workers = 1 if kind.startswith("tool") else rng.choice((1, 2, 3))
    return Call(kind, rng.choice(PROMPTS), rng.choice(SEEDS), workers, cut.get(kind, 0))


# ---- the soak -----------------------------------------------------------------------------------------


@dataclass
class Soak:
    models: dict[str, Any]
    seconds: float
    deadline: float
    outcomes: list[Outcome] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    in_flight: dict[int, tuple[float, Call]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome | None = None, failure: str | None = None) -> None:
        with self.lock:
            if outcome is not None:
                self.outcomes.append(outcome)
            if failure is not None:
                self.failures.append(failure)

    def thread_loop(self, index: int, end: float) -> None:
        rng = random.Random(1000 + index)
        while time.monotonic() < end:
            call = draw(rng, is_async=False)
            started = time.monotonic()
            with self.lock:
                self.in_flight[threading.get_ident()] = (started, call)
            try:
                outcome = run_sync(self.models, call)
                outcome.seconds = time.monotonic() - started
                self.record(outcome)
                if outcome.seconds > self.deadline:
                    self.record(failure=f"{call} took {outcome.seconds:.1f} s (deadline {self.deadline:g} s)")
            except Exception as error:
                self.record(failure=f"{call} raised {type(error).__name__}: {error}")
            finally:
                with self.lock:
                    self.in_flight.pop(threading.get_ident(), None)

    async def task_loop(self, index: int, end: float) -> None:
        rng = random.Random(2000 + index)
        while time.monotonic() < end:
            call = draw(rng, is_async=True)
            started = time.monotonic()
            try:
                outcome = await asyncio.wait_for(run_async(self.models, call), self.deadline)
                outcome.seconds = time.monotonic() - started
                self.record(outcome)
            except asyncio.TimeoutError:
                self.record(failure=f"{call} hung: no result after {self.deadline:g} s")
            except Exception as error:
                self.record(failure=f"{call} raised {type(error).__name__}: {error}")

    def watch(self, stop: threading.Event) -> None:
        """Report sync calls that pass their deadline (a thread cannot be interrupted)."""
        reported: set[tuple[int, float]] = set()
        while not stop.wait(1.0):
            now = time.monotonic()
            with self.lock:
                late = [(ident, s, c) for ident, (s, c) in self.in_flight.items() if now - s > self.deadline]
            for ident, started, call in late:
                if (ident, started) not in reported:
                    reported.add((ident, started))
                    self.record(failure=f"{call} hung: still running after {self.deadline:g} s")

    def run(self, n_threads: int, n_tasks: int) -> None:
        end = time.monotonic() + self.seconds
        stop = threading.Event()
        watcher = threading.Thread(target=self.watch, args=(stop,), daemon=True)
        watcher.start()
        threads = [
            threading.Thread(target=self.thread_loop, args=(i, end), name=f"soak-{i}", daemon=True)
            for i in range(n_threads)
        ]
        for thread in threads:
            thread.start()

        async def tasks() -> None:
            await asyncio.gather(*(self.task_loop(i, end) for i in range(n_tasks)))

        asyncio.run(tasks())
        for thread in threads:
            thread.join(timeout=max(0.0, end - time.monotonic()) + self.deadline)
            if thread.is_alive():
                self.record(failure=f"thread {thread.name} did not finish its last call")
        stop.set()


def twins(soak: Soak) -> tuple[int, list[str]]:
    """Run each distinct call alone once and compare every outcome of it; (comparisons, mismatches)."""
    expected: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    mismatches, compared = [], 0
    for outcome in soak.outcomes:
        if outcome.status == "cancelled":
            continue
        key = outcome.call.twin_key
        if key not in expected:
            expected[key] = run_sync(soak.models, Call(*key)).signature
        want, got = expected[key], outcome.signature
        compared += 1
        if outcome.status == "completed":
            ok = got == want
        elif len(got) == 1:  # an abandoned stream: what it received begins the twin's content
            ok = _prefix(got[0], want[0])
        else:  # cut by its timeout: every worker's text begins the twin's
            ok = len(got[1]) == len(want[1]) and all(map(_prefix, got[1], want[1]))
        if not ok:
            mismatches.append(f"{outcome.call} ({outcome.status}) differs from its twin:\n  {got}\n  {want}")
    return compared, mismatches


def _prefix(part: str, whole: str) -> bool:
    return whole.startswith(part.rstrip("\ufffd"))


# ---- memory -------------------------------------------------------------------------------------------


def live_tensor_bytes() -> int:
    total = 0
    for obj in gc.get_objects():
        with contextlib.suppress(ReferenceError, RuntimeError):
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                total += obj.untyped_storage().nbytes()
    return total


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def settle(engine: HogwildEngine) -> tuple[int, int]:
    """(live tensor bytes, RSS) after dropping the engine's cached prompt and collecting garbage."""
    prompt_cache = getattr(engine, "prompt_cache", None)
    if prompt_cache is not None and hasattr(prompt_cache, "clear"):
        prompt_cache.clear()  # holds the K/V of whichever prompt came last
    for _ in range(3):
        gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages (glibc)
    return live_tensor_bytes(), rss_bytes()


def engine_is_free(engine: HogwildEngine) -> bool:
    busy = getattr(engine, "busy", None)
    if busy is not None:
        return not busy
    if engine.lock.acquire(blocking=False):
        engine.lock.release()
        return True
    return False


# ---- main ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=600.0, help="how long calls are issued (default 600)"
    )
    parser.add_argument("--threads", type=int, default=8, help="threads making sync calls (default 8)")
    parser.add_argument("--tasks", type=int, default=8, help="asyncio tasks making async calls (default 8)")
    parser.add_argument(
        "--model", choices=("tiny", "embedded"), default="tiny", help="the model (default tiny)"
    )
    parser.add_argument("--call-deadline", type=float, default=120.0, help="seconds any one call may take")
    parser.add_argument("--tensor-tolerance-mb", type=float, default=1.0, help="live tensor growth allowed")
    parser.add_argument("--rss-tolerance-mb", type=float, default=150.0, help="RSS growth allowed")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    engine = tiny_engine() if args.model == "tiny" else HogwildEngine.from_pretrained(device="cpu")
    models = build_models(engine)
    for kind in KINDS:  # one of each, so that lazily built state exists before the baseline
        call = Call(
            kind, PROMPTS[0], 0, 1 if kind.startswith("tool") else 2, 2 if kind != "cancelled" else 10
        )
        if kind == "cancelled":
            asyncio.run(run_async(models, call))
        else:
            run_sync(models, call)
    tensors_before, rss_before = settle(engine)

    soak = Soak(models, args.seconds, args.call_deadline)
    started = time.monotonic()
    soak.run(args.threads, args.tasks)
    elapsed = time.monotonic() - started
    free = engine_is_free(engine)
    tensors_after, rss_after = settle(engine)
    compared, mismatches = twins(soak)
    tensors_end, rss_end = settle(engine)

    failures = list(soak.failures) + mismatches
    if not free:
        failures.append("the engine is still busy after every call ended")
    tensor_growth = (tensors_after - tensors_before) / 2**20
    rss_growth = (rss_after - rss_before) / 2**20
    if tensor_growth > args.tensor_tolerance_mb:
        failures.append(
            f"live tensors grew by {tensor_growth:.2f} MiB (tolerance {args.tensor_tolerance_mb})"
        )
    if rss_growth > args.rss_tolerance_mb:
        failures.append(f"RSS grew by {rss_growth:.1f} MiB (tolerance {args.rss_tolerance_mb:g})")

    by_status = Counter((o.call.kind, o.status) for o in soak.outcomes)
    print(f"soak: {elapsed:.0f} s, {args.threads} threads + {args.tasks} asyncio tasks, model {args.model}")
    print(f"calls ended: {len(soak.outcomes)} ({len(soak.outcomes) / max(elapsed, 1e-9):.1f}/s)")
    for kind in KINDS:
        counts = {status: n for (k, status), n in by_status.items() if k == kind}
        longest = max((o.seconds for o in soak.outcomes if o.call.kind == kind), default=0.0)
        print(f"  {kind:17s} {json.dumps(counts)}  longest {longest:.2f} s")
    print(f"compared with sequential twins: {compared} ({len(mismatches)} differ)")
    print(f"engine free at the end: {free}")
    print(
        f"live tensors: {tensors_before / 2**20:.2f} MiB before, {tensors_after / 2**20:.2f} after the soak, "
        f"{tensors_end / 2**20:.2f} after the twins"
    )
    print(
        f"RSS: {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} after the soak "
        f"({rss_growth:+.0f}; tolerance {args.rss_tolerance_mb:g}), {rss_end / 2**20:.0f} after the twins"
    )
    for failure in failures[:20]:
        print(f"FAIL: {failure}")
    if len(failures) > 20:
        print(f"... and {len(failures) - 20} more failures")
    print("PASS" if not failures else f"FAILED ({len(failures)} problems)")
    sys.stdout.flush()
    if soak.in_flight:  # a hung call's thread cannot be joined
        os._exit(1)
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
