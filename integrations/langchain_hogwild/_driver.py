"""One chat call as one Hogwild run on the engine's scheduler: guided by a run controller.

`submit_call` submits the run with a `CallController`, which the scheduler calls between steps: it
guides one worker (forced tool calls, JSON output) and watches for tool calls; a tool call by any
worker (or the guided value being complete) stops the run. The caller iterates the handle's events
and reads the outcome once the run has ended.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.handle import RunHandle
from hogwild_agents.results import HogwildResult, StepRecord
from hogwild_agents.run import HogwildRun
from hogwild_agents.tool_calls import OPEN, ParsedToolCall, find_complete_tool_call, parse_tool_calls
from langchain_hogwild._guided import GuidedWriter, object_program, tool_call_program


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
    """The state of one call's run while it steps: a run controller (see `run.RunController`)."""

    def __init__(self, spec: CallSpec) -> None:
        self.spec = spec
        self.run: HogwildRun | None = None
        self.parameters = {t["function"]["name"]: t["function"].get("parameters") or {} for t in spec.tools}
        self.watch_tools = bool(self.parameters) and spec.tool_choice != "none"
        self.guide: GuidedWriter | None = None
        self.guide_kind = ""
        self.calls: list[ParsedToolCall] = []
        self.tool_worker: int | None = None
        self.scan_from: list[int] = []

    # ---- RunController ---------------------------------------------------------------------------
    def start(self, run: HogwildRun) -> None:
        self.run = run
        self.scan_from = [len(w.text) for w in run.workers]
        spec, worker = self.spec, self.spec.guide_worker
        if spec.json_schema is not None:
            self._guide(worker, object_program(spec.json_schema), "json")
        elif self.watch_tools and spec.tool_choice is not None:
            name = None if spec.tool_choice == "any" else spec.tool_choice
            if name is None and len(self.parameters) == 1:
                name = next(iter(self.parameters))
            self._guide(worker, tool_call_program(self.parameters, name), "tool")

    def after_step(self, run: HogwildRun, record: StepRecord) -> bool:
        self.observe(record)
        return self.stopped

    def finish(self, run: HogwildRun, stopped: bool) -> None:
        if not stopped:
            self.unfinished_calls()

    def outcome(self, result: HogwildResult) -> Outcome:
        """The call's outcome once the run has ended."""
        return Outcome(
            result=result,
            content=_content(self, result),
            tool_calls=self.calls,
            tool_worker=self.tool_worker,
            reused_tokens=self.run.reused_tokens if self.run is not None else 0,
        )

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


CallController = _Session


def submit_call(engine: HogwildEngine, spec: CallSpec) -> tuple[RunHandle, CallController]:
    """Submit the call's run; returns its handle and the controller that will hold its outcome."""
    controller = CallController(spec)
    return engine.submit(spec.messages, controller=controller, **spec.options), controller


def _content(session: _Session, result: HogwildResult) -> str:
    if session.calls:
        return ""
    if session.guide is not None and session.guide_kind == "json":
        return json.dumps(session.guide.value, ensure_ascii=False)
    return result.final_text.strip()
