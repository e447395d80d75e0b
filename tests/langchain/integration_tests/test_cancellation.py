"""Cancelled and abandoned calls stop their run at once, free the engine, and change no later call.

The runs use a tiny random-weight model: it never samples its end-of-sequence token, so a run that
was not stopped would go on for its whole (large) budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from hogwild_agents import HogwildEngine, Hooks
from langchain_hogwild import ChatHogwild
from tests.test_robustness import live_tensor_bytes

PROMPT = "Write a very long story about a lighthouse."
LONG_RUN = {"n_workers": 2, "protocol": None, "max_tokens": 3000}
SAMPLED = {"n_workers": 2, "protocol": None, "max_tokens": 6, "temperature": 0.8}
MAX_TENSOR_GROWTH = 64 * 1024  # a leaked run of LONG_RUN holds megabytes of cache


class StepCounter:
    """A model whose run counts its steps, so a test can see when the run is going."""

    def __init__(self, engine: HogwildEngine) -> None:
        self.steps = 0
        self.started = threading.Event()
        self.model = ChatHogwild(engine=engine, hooks=Hooks(on_step=self._on_step), **LONG_RUN)

    def _on_step(self, record: object) -> None:
        self.steps += 1
        if self.steps >= 3:
            self.started.set()

    async def wait_started(self) -> None:
        while not self.started.is_set():
            await asyncio.sleep(0.01)

    def assert_stopped(self, engine: HogwildEngine) -> None:
        """The engine is free now and the run takes no further step."""
        assert not engine.busy, "the cancelled run is still on the engine"
        seen = self.steps
        time.sleep(0.3)
        assert self.steps == seen < LONG_RUN["max_tokens"]


@pytest.fixture
def engine(tiny_engines) -> HogwildEngine:
    return tiny_engines["llama"]


def reply_of(model: ChatHogwild, seed: int) -> tuple[str, list[str]]:
    message = model.invoke(PROMPT, seed=seed)
    return message.content, [w["text"] for w in message.response_metadata["workers"]]


async def areply_of(model: ChatHogwild, seed: int) -> tuple[str, list[str]]:
    message = await model.ainvoke(PROMPT, seed=seed)
    return message.content, [w["text"] for w in message.response_metadata["workers"]]


def baseline_bytes(engine: HogwildEngine) -> int:
    """Live tensor bytes once the engine's prompt cache holds PROMPT (as after any run of it)."""
    ChatHogwild(engine=engine, n_workers=2, protocol=None, max_tokens=2).invoke(PROMPT)
    return live_tensor_bytes()


def assert_unchanged(engine: HogwildEngine, expected: tuple[str, list[str]]) -> None:
    """Sync and async calls with a seed give what they gave before the cancelled call."""
    model = ChatHogwild(engine=engine, **SAMPLED)
    assert reply_of(model, seed=5) == expected
    assert asyncio.run(areply_of(model, seed=5)) == expected


def test_cancelling_an_astream_task_stops_its_run(engine) -> None:
    expected = reply_of(ChatHogwild(engine=engine, **SAMPLED), seed=5)
    before = baseline_bytes(engine)
    counter = StepCounter(engine)

    async def consume() -> None:
        async for _ in counter.model.astream(PROMPT):
            pass

    async def cancel_mid_run() -> None:
        task = asyncio.create_task(consume())
        await counter.wait_started()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
        counter.assert_stopped(engine)

    asyncio.run(cancel_mid_run())
    assert live_tensor_bytes() - before <= MAX_TENSOR_GROWTH
    assert_unchanged(engine, expected)


def test_closing_an_astream_early_stops_its_run(engine) -> None:
    expected = reply_of(ChatHogwild(engine=engine, **SAMPLED), seed=5)
    before = baseline_bytes(engine)
    closed, dropped = StepCounter(engine), StepCounter(engine)

    async def read_then_close() -> None:
        stream = closed.model.astream(PROMPT)
        async for _ in stream:
            await closed.wait_started()
            break
        await stream.aclose()  # returns once the run has stopped
        closed.assert_stopped(engine)

    async def read_then_drop() -> None:
        async for _ in dropped.model.astream(PROMPT):
            await dropped.wait_started()
            break  # the dropped stream is closed by the event loop's async-generator finalizer
        for _ in range(100):  # the finalizer runs on a later turn of the event loop
            await asyncio.sleep(0.02)
            if not engine.busy:
                break
        dropped.assert_stopped(engine)

    asyncio.run(read_then_close())
    asyncio.run(read_then_drop())
    assert live_tensor_bytes() - before <= MAX_TENSOR_GROWTH
    assert_unchanged(engine, expected)


def test_leaving_astream_events_early_stops_its_run(engine) -> None:
    expected = reply_of(ChatHogwild(engine=engine, **SAMPLED), seed=5)
    counter = StepCounter(engine)

    async def read_events() -> None:
        events = counter.model.astream_events(PROMPT, version="v2")
        async for event in events:
            if event["event"] == "on_custom_event" and counter.started.is_set():
                break
        await events.aclose()
        counter.assert_stopped(engine)

    asyncio.run(read_events())
    assert_unchanged(engine, expected)


def test_breaking_out_of_a_sync_stream_stops_its_run(engine) -> None:
    expected = reply_of(ChatHogwild(engine=engine, **SAMPLED), seed=5)
    before = baseline_bytes(engine)
    counter = StepCounter(engine)
    for _ in counter.model.stream(PROMPT):
        if counter.started.is_set():
            break  # the stream generator is closed here, and its run with it
    counter.assert_stopped(engine)
    assert live_tensor_bytes() - before <= MAX_TENSOR_GROWTH
    assert_unchanged(engine, expected)


def test_a_cancelled_call_waiting_for_the_engine_never_runs(engine) -> None:
    # an engine whose cache holds one LONG_RUN at a time: a second call waits in the queue for room
    one_run = engine.build_run(PROMPT, n_workers=2, max_new_tokens=LONG_RUN["max_tokens"]).reservation_pages
    small = HogwildEngine(
        engine.model, engine.tokenizer, max_cache_bytes=int(1.5 * one_run) * engine.scheduler.pool.page_bytes
    )
    counter = StepCounter(small)
    queued_steps: list[int] = []
    queued = ChatHogwild(engine=small, hooks=Hooks(on_step=queued_steps.append), **LONG_RUN)

    async def cancel_the_queued_call() -> None:
        first = asyncio.create_task(counter.model.ainvoke(PROMPT))
        await counter.wait_started()
        second = asyncio.create_task(queued.ainvoke(PROMPT))
        await asyncio.sleep(0.2)  # the second call now waits for room in the cache
        assert small.scheduler.queued_runs == 1
        started = time.monotonic()
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
        assert time.monotonic() - started < 2.0  # it did not wait for the first run to end
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        counter.assert_stopped(small)

    asyncio.run(cancel_the_queued_call())
    assert queued_steps == []


def test_a_sync_stream_read_from_many_threads_completes(engine) -> None:
    """Each `next()` on a different pool thread (what Starlette's iterate_in_threadpool does)."""
    from concurrent.futures import ThreadPoolExecutor

    model = ChatHogwild(engine=engine, **SAMPLED)
    stream = model.stream(PROMPT, seed=5)
    chunks = []
    with ThreadPoolExecutor(4) as pool:
        while True:
            chunk = pool.submit(next, stream, None).result()
            if chunk is None:
                break
            chunks.append(chunk)
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.usage_metadata["output_tokens"] > 0 and full.response_metadata["workers"]
    assert not engine.busy
    assert_unchanged(engine, reply_of(ChatHogwild(engine=engine, **SAMPLED), seed=5))


def test_a_half_read_stream_closed_from_another_thread_stops_its_run(engine) -> None:
    counter = StepCounter(engine)
    stream = counter.model.stream(PROMPT)
    next(stream)
    while not counter.started.is_set():
        next(stream)
    closer = threading.Thread(target=stream.close)
    closer.start()
    closer.join(10)
    assert not closer.is_alive()
    counter.assert_stopped(engine)
    assert_unchanged(engine, reply_of(ChatHogwild(engine=engine, **SAMPLED), seed=5))
