"""The step scheduler: one thread per engine that owns the forward loop, over one pooled KV cache.

Runs are submitted from any thread or asyncio task and wait in a queue until the pool can hold them
(admission control: each run reserves the pages it may need; a run that could never fit is refused at
submission). Admitted runs join at the next step boundary and leave when done. Each tick is ONE forward
over the rows of every active run — decode tokens, the prompt chunks of runs joining, forced and tool
text — within a token budget, so that a long prompt joining does not stall everyone's decoding: every
run's single-token rows always go, multi-token writes share the rest of the budget in arrival order.

A run's tokens depend only on its own inputs and seed (it samples with its own generator), never on
which runs share its forwards; see README ("Many runs at once") for where this holds bit for bit.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hogwild_agents.cache import KVPool
from hogwild_agents.errors import CacheCapacityError
from hogwild_agents.handle import RunHandle
from hogwild_agents.plan import ForwardPlan, RowPlan
from hogwild_agents.run import HogwildRun, Idle, Request, RunController, RunProgram

DEFAULT_BATCH_TOKENS = 512
_SCHEDULERS: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _shut_down_all() -> None:
    """Stop every scheduler thread before the interpreter tears down torch (a thread still inside
    torch at that point aborts the process)."""
    for scheduler in list(_SCHEDULERS):
        scheduler.shutdown()


@dataclass(eq=False)
class _Entry:
    run: HogwildRun
    controller: RunController | None
    handle: RunHandle
    pages: int
    program: RunProgram | None = None
    request: Request | None = None
    cancelled: bool = False
    waking: set[int] = field(default_factory=set)  # ids of futures that already wake the scheduler

    @property
    def tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.request) if isinstance(self.request, list) else 0


class Scheduler:
    """Drives every submitted run of one engine; see the module docstring."""

    def __init__(
        self,
        forward: Callable[[ForwardPlan, Callable], torch.Tensor],
        pool: KVPool,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    ) -> None:
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self._forward = forward
        self.pool = pool
        self.max_batch_tokens = max_batch_tokens
        self._cond = threading.Condition()
        self._waiting: deque[_Entry] = deque()
        self._active: list[_Entry] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        self.forwards = 0  # forwards run so far (for inspection and benchmarks)
        _SCHEDULERS.add(self)

    # ---- any thread ------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """True while any run is queued or running."""
        with self._cond:
            return bool(self._waiting or self._active)

    @property
    def active_runs(self) -> int:
        with self._cond:
            return len(self._active)

    @property
    def queued_runs(self) -> int:
        with self._cond:
            return len(self._waiting)

    def in_driver_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, run: HogwildRun, controller: RunController | None = None) -> RunHandle:
        """Queue `run`; it starts at the next step boundary where the pool can hold it."""
        pages = run.reservation_pages
        if not self.pool.fits_alone(pages):
            cap = self.pool.max_pages * self.pool.page_bytes
            need = pages * self.pool.page_bytes
            raise CacheCapacityError(
                f"This run may need {need / 2**20:.1f} MiB of KV cache (prompt {run.prompt_tokens} tokens, "
                f"{len(run.workers)} workers x {run.limits.max_new_tokens} new tokens), more than the "
                f"engine's cache cap of {cap / 2**20:.1f} MiB; lower max_new_tokens or n_workers, or "
                "raise max_cache_bytes."
            )
        handle = RunHandle(run, self._cancel, self.in_driver_thread)
        run.add_listener(handle.push)
        entry = _Entry(run, controller, handle, pages)
        with self._cond:
            self._waiting.append(entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="hogwild-scheduler", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        return handle

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel every run and stop the thread (a later `submit` starts it again)."""
        with self._cond:
            thread, self._closing = self._thread, True
            for entry in (*self._waiting, *self._active):
                entry.cancelled = True
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            self._closing = False

    def _cancel(self, handle: RunHandle) -> None:
        with self._cond:
            for entry in (*self._waiting, *self._active):
                if entry.handle is handle:
                    entry.cancelled = True
            self._cond.notify_all()

    def _wake(self, *_: object) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the scheduler thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._active and not self._closing:
                    self._cond.wait()
                if self._closing and not self._waiting and not self._active:
                    self._thread = None
                    return
            self._turn()  # its locals (entries, requests) go when it returns, not at the next wait

    def _turn(self) -> None:
        with self._cond:
            dropped = [e for e in self._waiting if e.cancelled]
            for entry in dropped:
                self._waiting.remove(entry)
        for entry in dropped:
            entry.run.cancel()
            entry.handle.resolve(entry.run.result())
        for entry in [e for e in self._active if e.cancelled]:
            self._stop(entry)
        self._admit()
        try:
            self._tick()
        except BaseException as error:  # never leave the loop: fail what was running instead
            for entry in list(self._active):
                self._end(entry, error=error)

    def _admit(self) -> None:
        with self._cond:
            while self._waiting and self.pool.can_reserve(self._waiting[0].pages):
                entry = self._waiting.popleft()
                self.pool.reserve(entry.pages)
                entry.program = entry.run.program(entry.controller)
                self._active.append(entry)

    def _advance(self, entry: _Entry, value: object) -> None:
        try:
            entry.request = entry.program.send(value)
        except StopIteration as stop:
            self._end(entry, result=stop.value)
        except BaseException as error:
            self._end(entry, error=error)

    def _end(self, entry: _Entry, result: object = None, error: BaseException | None = None) -> None:
        if entry.program is not None:
            entry.program.close()
        try:
            entry.run.close()
        finally:
            self.pool.unreserve(entry.pages)
            with self._cond:
                if entry in self._active:
                    self._active.remove(entry)
            entry.handle.resolve(result, error)

    def _stop(self, entry: _Entry) -> None:
        """Cancel an active run between two steps; its result keeps what was written."""
        entry.program.close()
        entry.run.cancel()
        try:
            result = entry.run.result()
        except BaseException as error:
            self._end(entry, error=error)
            return
        self._end(entry, result=result)

    def _tick(self) -> None:
        for entry in list(self._active):
            if entry.request is None:
                self._advance(entry, None)
        now = time.monotonic()
        for entry in list(self._active):
            request = entry.request
            if isinstance(request, Idle) and (
                now >= request.deadline or any(f.done() for f in request.futures)
            ):
                self._advance(entry, None)
        chosen, used = [], 0
        for entry in self._active:
            if not isinstance(entry.request, list):
                continue
            single = all(len(r.token_ids) == 1 for r in entry.request)
            if single or not chosen or used + entry.tokens <= self.max_batch_tokens:
                chosen.append(entry)
                used += 0 if single else entry.tokens
        if not chosen:
            self._idle()
            return
        by_attention: dict[Callable, list[_Entry]] = {}
        for entry in chosen:
            by_attention.setdefault(entry.run.attend, []).append(entry)
        for attend, entries in by_attention.items():
            rows: list[RowPlan] = [row for entry in entries for row in entry.request]
            try:
                logits = self._forward(ForwardPlan(rows, self.pool), attend)
            except BaseException as error:
                for entry in entries:
                    self._end(entry, error=error)
                continue
            self.forwards += 1
            start = 0
            for entry in entries:
                count = len(entry.request)
                self._advance(entry, logits[start : start + count])
                start += count

    def _idle(self) -> None:
        """Nothing to feed: every active run waits for tools (or the queue for room). Sleep until a
        tool returns, a deadline passes, or something is submitted or cancelled."""
        deadlines = []
        for entry in self._active:
            if isinstance(entry.request, Idle):
                deadlines.append(entry.request.deadline)
                for future in entry.request.futures:
                    if id(future) not in entry.waking:
                        entry.waking.add(id(future))
                        future.add_done_callback(self._wake)
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.05
        with self._cond:
            if any(e.cancelled for e in (*self._waiting, *self._active)):
                return
            if self._waiting and not self._active:
                return  # admit on the next turn
            self._cond.wait(timeout=max(timeout, 0.001))
