"""One chat call as one Hogwild run: start, guide (forced tool calls, JSON output), step, stop.

The run holds the engine's lock from start to finish, so calls on one engine queue up and never
interleave. A tool call by any worker ends the run. A call given a `cancelled` event stops between two
steps (or while it waits for the engine) once the event is set.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.results import HogwildResult, StepRecord
from hogwild_agents.run import HogwildRun
from hogwild_agents.tool_calls import OPEN, ParsedToolCall, find_complete_tool_call, parse_tool_calls
from langchain_hogwild._guided import GuidedWriter, object_program, tool_call_program

Step = tuple[HogwildRun, StepRecord]
LOCK_POLL_S = 0.05  # how often a call waiting for the engine looks at its cancellation event


class CallCancelled(Exception):
    """The caller stopped waiting for the call (a cancelled task, a closed stream)."""


@dataclass(frozen=True)
class CallSpec:
    """Everything one call needs. `tool_choice`: None (auto), "none", "any" or a tool name;
    `json_schema`: write the answer as JSON guided by this schema (`{}`: any JSON object)."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]  # keyword arguments of HogwildEngine.start (tools excluded)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | None = None
    json_schema: dict[str, Any] | None = None
    guide_worker: int = 0


@dataclass
class Outcome:
    result: HogwildResult
    content: str
    tool_calls: list[ParsedToolCall]
    tool_worker: int | None
    reused_tokens: int


class _Session:
    """The state of one call's run while it steps."""

    def __init__(self, run: HogwildRun, spec: CallSpec) -> None:
        self.run, self.spec = run, spec
        self.parameters = {t["function"]["name"]: t["function"].get("parameters") or {} for t in spec.tools}
        self.watch_tools = bool(self.parameters) and spec.tool_choice != "none"
        self.guide: GuidedWriter | None = None
        self.guide_kind = ""
        self.calls: list[ParsedToolCall] = []
        self.tool_worker: int | None = None
        self.scan_from = [len(w.text) for w in run.workers]
        worker = spec.guide_worker
        if spec.json_schema is not None:
            self._guide(worker, object_program(spec.json_schema), "json")
        elif self.watch_tools and spec.tool_choice is not None:
            name = None if spec.tool_choice == "any" else spec.tool_choice
            if name is None and len(self.parameters) == 1:
                name = next(iter(self.parameters))
            self._guide(worker, tool_call_program(self.parameters, name), "tool")

    def _guide(self, worker: int, program: Any, kind: str) -> None:
        self.guide, self.guide_kind = GuidedWriter(self.run, worker, program), kind

    @property
    def stopped(self) -> bool:
        """True once the call has what it needs (a tool call, the guided JSON) before the run ends."""
        return bool(self.calls) or (self.guide is not None and self.guide.done)

    def observe(self, record: StepRecord) -> None:
        if self.guide is not None:
            self.guide.observe(record)
            if self.guide.done and self.guide_kind == "tool" and isinstance(self.guide.value, ParsedToolCall):
                self.calls, self.tool_worker = [self.guide.value], self.guide.worker
            return
        if not self.watch_tools:
            return
        for w, text in record.texts.items():
            if record.sources.get(w) != "sampled":
                continue
            full = self.run.workers[w].text
            engine_call = self._engine_tool_call(full, w)
            if engine_call:
                continue  # the run executes it; not a call for the caller
            if find_complete_tool_call(full, self.scan_from[w]) is not None:
                self.calls = parse_tool_calls(full[self.scan_from[w] :])
                self.tool_worker = w
                return
            if full.rstrip().endswith(OPEN) and OPEN in text and not self.run.workers[w].finished:
                self._guide(w, tool_call_program(self.parameters, opened=True), "tool")
                return

    def _engine_tool_call(self, full: str, worker: int) -> bool:
        """Skip past a complete call of an in-engine tool (the run itself executes those)."""
        runner = self.run.tool_runner
        match = find_complete_tool_call(full, self.scan_from[worker]) if runner is not None else None
        if match is None or match.name not in runner.tools:
            return False
        self.scan_from[worker] = match.end
        return True

    def unfinished_calls(self) -> None:
        """After the run: a call some worker opened but never closed is reported as malformed."""
        if self.calls or not self.watch_tools:
            return
        for w, worker in enumerate(self.run.workers):
            calls = parse_tool_calls(worker.text[self.scan_from[w] :])
            if calls:
                self.calls, self.tool_worker = calls, w
                return


def iter_call(
    engine: HogwildEngine, spec: CallSpec, cancelled: threading.Event | None = None
) -> Generator[Step, None, Outcome]:
    """Run one call, yielding (run, record) after every step; returns the outcome. Holds the engine's
    lock throughout, so iterate it to the end (or close it) in one thread. Raises CallCancelled once
    `cancelled` is set: while waiting for the engine, or before the next step."""
    with _holding(engine.lock, cancelled):
        _check(cancelled)
        run = engine.start(spec.messages, **spec.options)
        try:
            session = _Session(run, spec)
            while not run.done and not session.stopped:
                _check(cancelled)
                record = run.step()
                yield run, record
                session.observe(record)
            if not session.stopped:
                run.conclude()  # the protocol's finisher, when the budget ended without an answer
                session.unfinished_calls()
            result = run.result()
        finally:
            run.close()
    return Outcome(
        result=result,
        content=_content(session, result),
        tool_calls=session.calls,
        tool_worker=session.tool_worker,
        reused_tokens=run.reused_tokens,
    )


@contextmanager
def _holding(lock: threading.RLock, cancelled: threading.Event | None) -> Iterator[None]:
    """Hold `lock`; give up with CallCancelled when `cancelled` is set while waiting for it."""
    if cancelled is None:
        lock.acquire()
    else:
        while not lock.acquire(timeout=LOCK_POLL_S):
            _check(cancelled)
    try:
        yield
    finally:
        lock.release()


def _check(cancelled: threading.Event | None) -> None:
    if cancelled is not None and cancelled.is_set():
        raise CallCancelled("The call was cancelled.")


def run_call(engine: HogwildEngine, spec: CallSpec) -> Outcome:
    """Run one call to its end (or its first tool call)."""
    steps = iter_call(engine, spec)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def _content(session: _Session, result: HogwildResult) -> str:
    if session.calls:
        return ""
    if session.guide is not None and session.guide_kind == "json":
        return json.dumps(session.guide.value, ensure_ascii=False)
    return result.final_text.strip()
