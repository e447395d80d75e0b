"""Async calls: the blocking run goes to a worker thread; its steps come back through a queue.

Cancelling the awaiting task, or closing the stream that started the call, stops the run between two
steps (or while it still waits for the engine) and waits for its thread: when the cancellation or
`aclose()` returns, the engine is free and the run's cache is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from hogwild_agents.engine import HogwildEngine
from langchain_hogwild._driver import CallCancelled, CallSpec, iter_call
from langchain_hogwild._events import worker_events


class CallGroup:
    """The threaded calls started inside one `astream`; closing that stream stops every one of them.

    `BaseChatModel.astream` does not close `_astream` when it is closed itself (the generator is only
    finalized later, by the garbage collector), so the stream stops its calls through this group."""

    def __init__(self) -> None:
        self._calls: list[tuple[threading.Event, asyncio.Future[None]]] = []

    def add(self, cancelled: threading.Event, future: asyncio.Future[None]) -> None:
        self._calls.append((cancelled, future))

    async def stop(self) -> None:
        """Cancel every call still running and wait until their threads have ended."""
        for cancelled, _ in self._calls:
            cancelled.set()
        for _, future in self._calls:
            with contextlib.suppress(Exception):
                await future
        self._calls.clear()


stream_calls: ContextVar[CallGroup | None] = ContextVar("hogwild_stream_calls", default=None)


async def run_in_thread(
    engine: HogwildEngine, spec: CallSpec, *, with_texts: bool = False
) -> AsyncIterator[Any]:
    """Run the call in a thread; yield each step's worker events (with worker 0's new text when
    `with_texts`), then the Outcome. Closing or cancelling the iteration stops the run."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()
    done = object()

    def put(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        steps = iter_call(engine, spec, cancelled)
        try:
            while True:
                try:
                    run, record = next(steps)
                except StopIteration as stop_iteration:
                    put(stop_iteration.value)
                    return
                events = worker_events(run, record)
                put((events, record.texts.get(0, "")) if with_texts else events)
        except CallCancelled:
            return
        except BaseException as error:  # handed to the awaiting side
            put(error)
        finally:
            steps.close()
            put(done)

    future = loop.run_in_executor(None, work)
    if (group := stream_calls.get()) is not None:
        group.add(cancelled, future)
    try:
        while (item := await queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        cancelled.set()
        await future
