"""Many runs through the engine's scheduler: a run sharing forwards with others equals the run alone,
the pooled cache holds its cap, and every submitted run completes or stops cleanly."""

from __future__ import annotations

import json
import threading
import time

import pytest

from hogwild_agents import HogwildEngine
from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.errors import CacheCapacityError
from hogwild_agents.results import StepEvent
from tests.conftest import named_script
from tests.test_equivalence import PROMPT, assert_logits_close
from tests.test_robustness import live_tensor_bytes

LAYOUT_CYCLE = ("combined", "interleaved", "contiguous")


class Steer:
    """A run controller that forces a paragraph break, an injected note and (with tools) a tool call
    at fixed steps, so that the same run does the same thing alone or among others."""

    def __init__(self, tool_call: bool) -> None:
        self.tool_call = tool_call

    def start(self, run) -> None:
        pass

    def after_step(self, run, record) -> bool:
        live = [w for w in run.workers if not w.finished]
        if record.index == 2 and live:
            run.force(live[0].index, "\n\n")
        if record.index == 4:
            run.inject("\n\n[note] a block every worker sees.\n\n")
        if record.index == 3 and self.tool_call and live:
            call = {"name": "calculator", "arguments": {"expression": "6 * 7"}}
            run.force(live[-1].index, f"<tool_call>{json.dumps(call)}</tool_call>")
        for call in run.tool_calls:  # a result joins at the first step after the tool returns: wait for
            if call.future is not None:  # it, so that it joins at the same step alone and among others
                call.future.result(timeout=10)
        return False

    def finish(self, run, stopped: bool) -> None:
        pass


def scenario(i: int) -> tuple[str, dict]:
    """Run i: its own prompt length, worker count, layout, protocol, seed; every third uses a tool."""
    n_workers = 1 + i % 4
    prompt = PROMPT + " More detail, please." * (i % 5)
    options = dict(
        n_workers=n_workers,
        layout=LAYOUT_CYCLE[i % 3],
        protocol=[named_script(prompt, n_workers), "collaborate", None][i % 3],
        max_new_tokens=14 + 3 * (i % 4),
        temperature=1.0,
        seed=100 + i,
        engine_tools=[calculator_tool()] if i % 3 == 1 else None,
    )
    return prompt, options


def submit(engine: HogwildEngine, i: int):
    prompt, options = scenario(i)
    return engine.submit(prompt, controller=Steer(options["engine_tools"] is not None), **options)


def steps_of(handle) -> list:
    records = [e.record for e in handle.events() if isinstance(e, StepEvent)]
    handle.result()
    return records


def assert_same_run(alone: list, shared: list) -> None:
    assert len(alone) == len(shared)
    for a, b in zip(alone, shared, strict=True):
        assert a.chosen == b.chosen and a.sources == b.sources
        assert a.logits.keys() == b.logits.keys()
        for worker, logits in a.logits.items():
            assert_logits_close(b.logits[worker], logits)


@pytest.mark.parametrize("concurrent", [1, 3, 8])
def test_a_run_sharing_forwards_equals_the_run_alone(tiny_engines, concurrent):
    engine = tiny_engines["qwen2"]
    alone = [steps_of(submit(engine, i)) for i in range(concurrent)]
    before = engine.scheduler.forwards
    # the first half starts together; the second half joins once the first run is a few steps in
    first = [submit(engine, i) for i in range(concurrent // 2 or 1)]
    while not first[0].done and sum(isinstance(e, StepEvent) for e in first[0]._events) < 3:
        time.sleep(0.005)
    later = [submit(engine, i) for i in range(len(first), concurrent)]
    shared = [steps_of(h) for h in first + later]
    for a, b in zip(alone, shared, strict=True):
        assert_same_run(a, b)
    if concurrent > 1:  # the runs really shared forwards
        alone_forwards = sum(len(steps) for steps in alone)
        assert engine.scheduler.forwards - before < alone_forwards
    assert not engine.busy


def settle(engine: HogwildEngine):
    """A measure of live tensor bytes that does not depend on timing: the scheduler thread stopped (a
    result can arrive while its last forward's locals are still alive) and the prompt cache (the K/V of
    whichever prompt was encoded last) emptied."""

    def measure() -> int:
        engine.scheduler.shutdown()
        engine.prompt_cache.clear()
        return live_tensor_bytes()

    return measure


def test_the_pool_holds_its_cap_and_200_runs_all_complete(tiny_engines):
    base = tiny_engines["llama"]
    one = base.build_run(PROMPT, n_workers=3, max_new_tokens=12).reservation_pages
    cap = 4 * one * base.scheduler.pool.page_bytes  # room for about four runs at once
    engine = HogwildEngine(base.model, base.tokenizer, max_cache_bytes=cap)
    pool = engine.scheduler.pool
    peak = {"pages": 0, "active": 0}
    grow = pool._grow

    def watched_grow(needed: int) -> None:
        grow(needed)
        peak["pages"] = max(peak["pages"], pool.n_pages)

    pool._grow = watched_grow
    engine.generate(PROMPT, n_workers=1, max_new_tokens=2)
    settled_bytes = settle(engine)
    baseline = settled_bytes()
    handles = [
        engine.submit(
            PROMPT + str(i % 9),
            n_workers=1 + i % 3,
            layout=LAYOUT_CYCLE[i % 3],
            protocol="collaborate" if i % 2 else None,
            max_new_tokens=4 + i % 9,
            temperature=1.0,
            seed=i,
        )
        for i in range(200)
    ]
    while not all(h.done for h in handles):
        peak["active"] = max(peak["active"], engine.scheduler.active_runs)
        time.sleep(0.01)
    results = [h.result() for h in handles]
    assert len(results) == 200 and all(r.finish_reason in ("stop", "length") for r in results)
    assert all(r.usage.generated_tokens > 0 for r in results)
    assert peak["pages"] * pool.page_bytes <= cap  # the storage never went past the cap
    assert 1 < peak["active"] <= 8  # runs shared forwards, but admission kept them to what fits
    assert pool.pages_in_use == 0 and pool.reserved == 0 and pool.bytes_allocated == 0
    del handles, results
    assert settled_bytes() - baseline <= 64 * 1024


def test_a_run_that_can_never_fit_is_refused_at_submission(tiny_engines):
    base = tiny_engines["llama"]
    engine = HogwildEngine(base.model, base.tokenizer, max_cache_bytes=64 * base.scheduler.pool.page_bytes)
    with pytest.raises(CacheCapacityError, match="max_cache_bytes"):
        engine.submit(PROMPT, n_workers=4, max_new_tokens=500)
    assert not engine.busy


def test_cancelling_one_run_leaves_the_others_untouched(tiny_engines):
    engine = tiny_engines["llama"]
    options = dict(n_workers=2, protocol="collaborate", max_new_tokens=20, temperature=1.0)
    expected = [engine.generate(PROMPT, seed=s, **options) for s in (1, 2)]
    started = threading.Event()
    doomed = engine.submit(PROMPT, n_workers=2, max_new_tokens=4000, temperature=1.0, seed=9)
    keep = [engine.submit(PROMPT, seed=s, **options) for s in (1, 2)]
    for event in doomed.events():
        if isinstance(event, StepEvent) and event.record.index == 5:
            started.set()
            break
    doomed.cancel()
    partial = doomed.result()
    assert partial.finish_reason == "cancelled"
    assert all(w.generated_tokens >= 5 for w in partial.workers)  # what was written is kept
    for handle, alone in zip(keep, expected, strict=True):
        assert [w.token_ids for w in handle.result().workers] == [w.token_ids for w in alone.workers]
    assert not engine.busy


def test_generate_many_returns_results_in_order(tiny_engines):
    engine = tiny_engines["llama"]
    prompts = [PROMPT + " " + str(i) for i in range(5)]
    options = dict(n_workers=2, max_new_tokens=6, temperature=1.0, seed=3)
    many = engine.generate_many(prompts, **options)
    for prompt, result in zip(prompts, many, strict=True):
        assert [w.token_ids for w in result.workers] == [
            w.token_ids for w in engine.generate(prompt, **options).workers
        ]


def test_a_failing_run_fails_alone(tiny_engines):
    engine = tiny_engines["llama"]

    def explode(record) -> None:
        if record.index == 2:
            raise RuntimeError("hook failed")

    from hogwild_agents import Hooks

    bad = engine.submit(PROMPT, n_workers=2, max_new_tokens=30, hooks=Hooks(on_step=explode))
    good = engine.submit(PROMPT, n_workers=2, max_new_tokens=8, seed=1, temperature=1.0)
    with pytest.raises(RuntimeError, match="hook failed"):
        bad.result()
    assert good.result().usage.generated_tokens > 0
    assert not engine.busy


def test_waiting_for_a_run_inside_the_scheduler_is_refused(tiny_engines):
    engine = tiny_engines["llama"]
    seen: list[BaseException] = []

    def nested(record) -> None:
        if record.index == 0:
            try:
                engine.generate(PROMPT, n_workers=1, max_new_tokens=2)
            except RuntimeError as error:
                seen.append(error)

    from hogwild_agents import Hooks

    engine.generate(PROMPT, n_workers=1, max_new_tokens=3, hooks=Hooks(on_step=nested))
    assert seen and "deadlock" in str(seen[0])
    assert not engine.busy
