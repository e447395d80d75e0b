"""RunHandle: a run submitted to the engine's scheduler, seen from the caller's side.

Every method is safe from any thread and from asyncio: the scheduler thread pushes events and the
outcome; callers read them. Events are kept for the handle's life, so iterating late (or twice) still
sees every event from the start.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from hogwild_agents.results import HogwildResult, RunEvent

if TYPE_CHECKING:
    from hogwild_agents.run import HogwildRun


class RunHandle:
    """A submitted run: `events()` / `aevents()` stream what its workers write, `result()` /
    `aresult()` wait for the outcome, `cancel()` stops it at the next step boundary.

    A cancelled run's result holds everything written before it stopped (finish reason "cancelled").
    If the run failed (a hook, tool callback or controller raised, or the forward itself), `result()`
    and the event iterators raise that error."""

    def __init__(self, run: HogwildRun, cancel: Callable[[RunHandle], None], in_driver: Callable[[], bool]):
        self.id = uuid.uuid4().hex
        self.run = run
        self._cancel = cancel
        self._in_driver = in_driver
        self._cond = threading.Condition()
        self._events: list[RunEvent] = []
        self._done = False
        self._result: HogwildResult | None = None
        self._error: BaseException | None = None
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # ---- the scheduler's side --------------------------------------------------------------------
    def push(self, event: RunEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._wake()

    def resolve(self, result: HogwildResult | None = None, error: BaseException | None = None) -> None:
        with self._cond:
            self._result, self._error, self._done = result, error, True
            self._wake()

    def _wake(self) -> None:  # the condition is held
        self._cond.notify_all()
        for loop, flag in self._wakers:
            loop.call_soon_threadsafe(flag.set)

    # ---- the caller's side -----------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self, wait: bool = True) -> None:
        """Stop the run at the next step boundary (or drop it from the queue). With `wait` (not from
        the scheduler's own thread), return once it has stopped and its cache is released."""
        if self._done:
            return
        self._cancel(self)
        if wait and not self._in_driver():
            with self._cond:
                self._cond.wait_for(lambda: self._done)

    async def acancel(self) -> None:
        """`cancel()` for asyncio: returns once the run has stopped, without blocking the event loop."""
        self.cancel(wait=False)
        async for _ in self.aevents_quietly():
            pass

    async def aevents_quietly(self) -> AsyncIterator[RunEvent]:
        """`aevents()` that ends without raising the run's error."""
        try:
            async for event in self.aevents():
                yield event
        except BaseException as error:
            if error is not self._error:
                raise

    def _check_thread(self) -> None:
        if self._in_driver():
            raise RuntimeError(
                "Waiting for a run from inside the engine's scheduler thread (a hook, controller or "
                "logits processor) would deadlock; submit it and let it run instead."
            )

    def result(self, timeout: float | None = None) -> HogwildResult:
        """Wait for the outcome (at most `timeout` seconds: then TimeoutError)."""
        self._check_thread()
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout=timeout):
                raise TimeoutError(f"run {self.id} did not finish within {timeout} s")
        return self._outcome()

    def _outcome(self) -> HogwildResult:
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def events(self) -> Iterator[RunEvent]:
        """Every event of the run, as it happens, until the run ends."""
        self._check_thread()
        index = 0
        while True:
            with self._cond:
                while index >= len(self._events) and not self._done:
                    self._cond.wait()
                batch, finished = self._events[index:], self._done
            index += len(batch)
            yield from batch
            if finished and index >= len(self._events):
                break
        if self._error is not None:
            raise self._error

    async def aevents(self) -> AsyncIterator[RunEvent]:
        """`events()` for asyncio: never blocks the event loop."""
        flag = asyncio.Event()
        waker = (asyncio.get_running_loop(), flag)
        with self._cond:
            self._wakers.append(waker)
        index = 0
        try:
            while True:
                with self._cond:
                    batch, finished = self._events[index:], self._done
                    if not batch and not finished:
                        flag.clear()
                index += len(batch)
                for event in batch:
                    yield event
                if finished and not batch:
                    break
                if not batch:
                    await flag.wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)
        if self._error is not None:
            raise self._error

    async def aresult(self) -> HogwildResult:
        """`result()` for asyncio."""
        async for _ in self.aevents():
            pass
        return self._outcome()
