"""One chat call as one Hogwild run: start, guide (tool calls, JSON output), step, stop.

The run holds the engine's lock from start to finish, so calls on one engine queue up and never
interleave. A tool call by any worker ends the run. A call given a `cancelled` event stops between two
steps (or while it waits for the engine) once the event is set.

Guided output is constrained by a grammar (`hogwild_agents.grammar`): a JSON answer, a forced tool call
("any"/"required"/a tool name), a tool call a worker opened itself under tool_choice auto, or, with both
tools and a response format, a tool call or the JSON answer. The constraint joins the worker's own
logits processors; the call ends once the guided text is complete (or its worker has stopped: the text
is then completed by the grammar's shortest path).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.grammar import Constraint, Grammar, json_schema_grammar, tool_call_grammar
from hogwild_agents.results import HogwildResult, StepRecord
from hogwild_agents.run import HogwildRun
from hogwild_agents.tool_calls import OPEN, ParsedToolCall, find_complete_tool_call, parse_tool_calls

Step = tuple[HogwildRun, StepRecord]
LOCK_POLL_S = 0.05  # how often a call waiting for the engine looks at its cancellation event


class CallCancelled(Exception):
    """The caller stopped waiting for the call (a cancelled task, a closed stream)."""


@dataclass(frozen=True)
class CallSpec:
    """Everything one call needs. `tool_choice`: None (auto), "none", "any" or a tool name;
    `json_schema`: write the answer as JSON valid against this schema (`{}`: any JSON object)."""

    messages: list[dict[str, Any]]
    options: dict[str, Any]  # keyword arguments of HogwildEngine.start (tools excluded)
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | None = None
    json_schema: dict[str, Any] | None = None
    guide_worker: int = 0
    reasoning: bool = True  # return the workers' transcripts with the answer


@dataclass
class Outcome:
    result: HogwildResult
    content: str
    tool_calls: list[ParsedToolCall]
    tool_worker: int | None
    reused_tokens: int
    answer_tokens: int = 0  # generated tokens that make up the answer (content or tool call)
    timings: dict[str, float] = field(default_factory=dict)  # total_s, prefill_s, decode_s


def answer_grammar(spec: CallSpec) -> Grammar | None:
    """The grammar a call's guided worker writes under from the start, if any."""
    forced = spec.tools and spec.tool_choice not in (None, "none")
    if forced:
        return tool_call_grammar(spec.tools, None if spec.tool_choice == "any" else spec.tool_choice)
    if spec.json_schema is None:
        return None
    schema = spec.json_schema or {"type": "object"}
    if spec.tools and spec.tool_choice is None:  # a tool call, or the answer in the response format
        return tool_call_grammar(spec.tools, or_json=schema)
    return json_schema_grammar(schema)


@dataclass
class _Guide:
    worker: int
    constraint: Constraint
    own: list[Any]  # the worker's logits processors before the constraint joined them


class _Session:
    """The state of one call's run while it steps."""

    def __init__(self, run: HogwildRun, spec: CallSpec) -> None:
        self.run, self.spec = run, spec
        self.prefilled_at = time.monotonic()  # the run's prompt and headers are encoded
        runner = run.tool_runner
        self.engine_tools = dict(runner.tools) if runner is not None else {}
        self.watch_tools = bool(spec.tools) and spec.tool_choice != "none"
        self.guide: _Guide | None = None
        self.calls: list[ParsedToolCall] = []
        self.tool_worker: int | None = None
        self.scan_from = [len(w.text) for w in run.workers]
        grammar = answer_grammar(spec)
        if grammar is not None:
            self._guide(spec.guide_worker, grammar)

    def _guide(self, worker: int, grammar: Grammar) -> None:
        """Constrain `worker` by `grammar` from its next token on, alongside its own processors."""
        run, state = self.run, self.run.workers[worker]
        own = list(run.logits_processors[worker])
        constraint = Constraint(
            run.engine,
            grammar,
            start=len(run.prompt_ids) + len(state.stream),
            budget=run.limits.max_new_tokens - state.generated,
        )
        run.logits_processors[worker] = [*own, constraint]
        self.guide = _Guide(worker, constraint, own)
        self._fast_forward()

    def _fast_forward(self) -> None:
        """Force the tokens the grammar leaves no choice about (they cost no budget)."""
        guide = self.guide
        if guide is None or self.run.workers[guide.worker].finished:
            return
        if forced := guide.constraint.forced_tokens():
            self.run.force(guide.worker, forced)

    def _unguide(self) -> None:
        if self.guide is not None:
            self.run.logits_processors[self.guide.worker] = self.guide.own
            self.guide = None

    @property
    def guide_done(self) -> bool:
        """The guided text is complete, or its worker stopped (its text is then completed)."""
        guide = self.guide
        return guide is not None and (guide.constraint.stopped or self.run.workers[guide.worker].finished)

    @property
    def stopped(self) -> bool:
        """True once the call has what it needs (a tool call, the guided answer) before the run ends."""
        return bool(self.calls) or self.guide_done

    def observe(self, record: StepRecord) -> None:
        if self.guide is not None:
            self._observe_guide()
            return
        if not (self.watch_tools or self.engine_tools):
            return
        for w, text in record.texts.items():
            if record.sources.get(w) != "sampled":
                continue
            full = self.run.workers[w].text
            if self._engine_tool_call(full, w):
                continue  # the run executes it; not a call for the caller
            if self.watch_tools and find_complete_tool_call(full, self.scan_from[w]) is not None:
                self.calls = parse_tool_calls(full[self.scan_from[w] :])
                self.tool_worker = w
                return
            if _just_opened(full, text) and not self.run.workers[w].finished:
                tools = [*(self.spec.tools if self.watch_tools else ()), *self._engine_schemas()]
                self._guide(w, tool_call_grammar(tools, opened=True))
                return

    def _observe_guide(self) -> None:
        guide = self.guide
        assert guide is not None
        state = self.run.workers[guide.worker]
        guide.constraint.sync(self.run.prompt_ids + state.stream)
        if not self.guide_done:
            self._fast_forward()
            return
        value = guide.constraint.value()
        if not isinstance(value, ParsedToolCall):
            return  # the JSON answer: `content` reads it
        bound = {t["function"]["name"] for t in self.spec.tools}
        if value.name in self.engine_tools and value.name not in bound:
            self.scan_from[guide.worker] = len(state.text)  # the run executes it and the worker goes on
            self._unguide()
            return
        self.calls, self.tool_worker = [value], guide.worker

    def _engine_schemas(self) -> list[dict[str, Any]]:
        runner = self.run.tool_runner
        return list(runner.schemas) if runner is not None else []

    def _engine_tool_call(self, full: str, worker: int) -> bool:
        """Skip past a complete call of an in-engine tool (the run itself executes those)."""
        match = find_complete_tool_call(full, self.scan_from[worker]) if self.engine_tools else None
        if match is None or match.name not in self.engine_tools:
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

    def content(self, result: HogwildResult) -> str:
        """The answer text: empty with a tool call, the guided JSON, else the run's final text."""
        if self.calls:
            return ""
        if self.guide is not None and self.guide_done:
            return self.guide.constraint.finish()
        return result.final_text.strip()

    def answer_tokens(self, result: HogwildResult) -> int:
        """Generated tokens that make up the answer: the guided text's, the tool call's, worker 0's whole
        text in a raw run (it is the answer), else the final answer's length in tokens."""
        engine = self.run.engine
        if self.guide is not None and (self.guide_done or self.calls):
            return self.guide.constraint.sampled
        if self.calls:
            return sum(len(engine.encode(OPEN + call.raw)) for call in self.calls)
        if result.answer is None:
            return result.workers[0].generated_tokens
        return min(len(engine.encode(result.answer)), result.usage.generated_tokens)

    def timings(self) -> dict[str, float]:
        """Seconds: the whole run, its prefill (prompt and headers), its steps."""
        now = time.monotonic()
        prefill = self.prefilled_at - self.run.started
        return {"total_s": now - self.run.started, "prefill_s": prefill, "decode_s": now - self.prefilled_at}


def _just_opened(full: str, new: str) -> bool:
    """The worker's newest text completes a `<tool_call>` opening tag, with nothing but blanks after it."""
    stripped = full.rstrip()
    return stripped.endswith(OPEN) and len(stripped) > len(full) - len(new)


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
        content=session.content(result),
        tool_calls=session.calls,
        tool_worker=session.tool_worker,
        reused_tokens=run.reused_tokens,
        answer_tokens=session.answer_tokens(result),
        timings=session.timings(),
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
