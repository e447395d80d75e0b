"""One chat call as one Hogwild run on the engine's scheduler, steered by a run controller.

`submit_call` submits the run with a `CallController`, which the scheduler calls between steps: it
guides one worker (forced tool calls, JSON output) and collects tool calls. The run stops once the
call has what it needs: the guided answer, or the workers' tool calls — with parallel tool calls, once
no worker is inside an unfinished call and each caller has had a few tokens to open another. The
caller iterates the handle's events and reads the outcome once the run has ended. The run finds the
tool calls (each step record lists the calls written in it and the calls left open); the controller
only decides which of them are the caller's and when it has them all.

Guided output is constrained by a grammar (`hogwild_agents.grammar`): a JSON answer, a forced tool call
("any"/"required"/a tool name), a tool call a worker opened itself under tool_choice auto, or, with both
tools and a response format, a tool call or the JSON answer. The constraint joins the worker's own
logits processors; the call ends once the guided text is complete (or its worker has stopped: the text
is then completed by the grammar's shortest path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.grammar import Constraint, Grammar, json_schema_grammar, tool_call_grammar
from hogwild_agents.handle import RunHandle
from hogwild_agents.results import HogwildResult, StepRecord
from hogwild_agents.run import HogwildRun
from hogwild_agents.tool_calls import OPEN, ParsedToolCall, unclosed_tool_call

GRACE_TOKENS = 4  # tokens a worker may write after its tool call before it must have opened another


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
    parallel_tool_calls: bool = True  # several calls (one per worker, or several from one) in a message


@dataclass
class Outcome:
    result: HogwildResult
    content: str
    tool_calls: list[ParsedToolCall]
    tool_worker: int | None  # the worker of the first call
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
    constraint: Constraint  # joins the worker's own logits processors while it guides


class _Session:
    """The state of one call's run while it steps: a run controller (see `run.RunController`)."""

    def __init__(self, spec: CallSpec) -> None:
        self.spec = spec
        self.run: HogwildRun | None = None
        self.engine_tools: dict[str, Any] = {}
        self.watch_tools = bool(spec.tools) and spec.tool_choice != "none"
        self.guide: _Guide | None = None
        self.calls: list[ParsedToolCall] = []
        self.call_workers: list[int] = []
        self.call_tokens: list[int] = []  # tokens each call's worker sampled to write it
        self.since_call: dict[int, int] = {}  # worker -> tokens written since its latest call
        # worker -> calls for the caller the run found in its text and this call has not taken yet
        # (while another worker is guided, and until the worker writes again)
        self.unread: dict[int, list[ParsedToolCall]] = {}
        self.completed: set[int] = set()  # workers whose open call the grammar completed (it is taken)
        self.prefilled_at = self.finished_at = 0.0

    # ---- RunController ---------------------------------------------------------------------------
    def start(self, run: HogwildRun) -> None:
        self.run = run
        self.prefilled_at = time.monotonic()  # the run's prompt and headers are encoded
        runner = run.tool_runner
        self.engine_tools = dict(runner.tools) if runner is not None else {}
        grammar = answer_grammar(self.spec)
        if grammar is not None:
            self._guide(self.spec.guide_worker, grammar)

    def after_step(self, run: HogwildRun, record: StepRecord) -> bool:
        self.observe(record)
        return self.stopped

    def finish(self, run: HogwildRun, stopped: bool) -> None:
        if not stopped:
            self.unfinished_calls()
        self.finished_at = time.monotonic()

    def outcome(self, result: HogwildResult) -> Outcome:
        """The call's outcome once the run has ended."""
        return Outcome(
            result=result,
            content=self.content(result),
            tool_calls=self.calls,
            tool_worker=self.call_workers[0] if self.call_workers else None,
            reused_tokens=self.run.reused_tokens if self.run is not None else 0,
            answer_tokens=self.answer_tokens(result) if self.run is not None else 0,
            timings=self.timings() if self.run is not None else {},
        )

    @property
    def tool_worker(self) -> int | None:
        return self.call_workers[0] if self.call_workers else None

    def _guide(self, worker: int, grammar: Grammar) -> None:
        """Constrain `worker` by `grammar` from its next token on, alongside its own processors."""
        run, state = self.run, self.run.workers[worker]
        constraint = Constraint(
            run.engine,
            grammar,
            start=len(run.prompt_ids) + len(state.stream),
            budget=run.limits.max_new_tokens - state.generated,
        )
        run.add_logits_processor(worker, constraint)
        self.guide = _Guide(worker, constraint)
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
            self.run.remove_logits_processor(self.guide.worker, self.guide.constraint)
            self.guide = None

    @property
    def guide_done(self) -> bool:
        """The guided text is complete, or its worker stopped (its text is then completed)."""
        guide = self.guide
        return guide is not None and (guide.constraint.stopped or self.run.workers[guide.worker].finished)

    @property
    def stopped(self) -> bool:
        """True once the call has what it needs (the guided answer, or its tool calls)."""
        if (
            self.guide is not None
            and self.guide_done
            and not isinstance(self.guide.constraint.value(), ParsedToolCall)
        ):
            return True
        if not self.calls or self.guide is not None:
            return False
        if not self.spec.parallel_tool_calls or self.spec.tool_choice not in (None, "auto"):
            return True  # a forced call is the answer
        run = self.run
        writing = [w for w in run.workers if not w.finished]
        inside = any(w.open_call is not None for w in writing)
        waiting = any(self.since_call.get(w.index, GRACE_TOKENS) < GRACE_TOKENS for w in writing)
        return not inside and not waiting

    def _add_call(self, call: ParsedToolCall, worker: int, sampled: int | None = None) -> None:
        """Take a call for the caller; `sampled`: its worker's sampled tokens in it (else its length)."""
        self.calls.append(call)
        self.call_workers.append(worker)
        if sampled is None:
            sampled = len(self.run.engine.encode(OPEN + call.raw))
        self.call_tokens.append(sampled)
        self.since_call[worker] = 0

    def observe(self, record: StepRecord) -> None:
        for w, ids in record.chosen.items():
            if w in self.since_call and record.sources.get(w) == "sampled":
                self.since_call[w] += len(ids)
        if self.watch_tools:  # the calls the run found; those of in-engine tools are the run's to run
            for w, written in record.tool_calls.items():
                self.unread.setdefault(w, []).extend(c.call for c in written if not c.in_engine)
        if self.guide is not None:
            self._observe_guide()
            if self.guide is not None:
                return
        if not (self.watch_tools or self.engine_tools):
            return
        if self.calls and not self.spec.parallel_tool_calls:
            return
        for w, text in record.texts.items():
            if record.sources.get(w) not in ("sampled", "forced"):
                continue  # a header or an interjection is never part of a call
            for call in self.unread.pop(w, []):
                if self.spec.parallel_tool_calls or not self.calls:
                    self._add_call(call, w)
            if _just_opened(record.open_calls.get(w), text) and not self.run.workers[w].finished:
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
        self.unread.pop(guide.worker, None)  # its calls are the guided one
        if state.open_call is not None:  # its worker stopped inside it: the grammar completed it
            self.completed.add(guide.worker)
        self._unguide()  # the worker goes on: it may open another call
        if value.name in self.engine_tools and value.name not in bound:
            return  # the run executes it
        self._add_call(value, guide.worker, guide.constraint.sampled)  # the grammar forced the rest

    def _engine_schemas(self) -> list[dict[str, Any]]:
        runner = self.run.tool_runner
        return list(runner.schemas) if runner is not None else []

    def unfinished_calls(self) -> None:
        """After the run: a call some worker opened but never closed is reported as malformed."""
        if self.calls or not self.watch_tools:
            return
        for w, worker in enumerate(self.run.workers):
            # no call was taken, so every call the run found for the caller is new here
            found = [c.call for c in worker.calls if not c.in_engine]
            if worker.open_call is not None and w not in self.completed:
                found.append(unclosed_tool_call(worker.open_call))
            for call in found:
                if self.spec.parallel_tool_calls or not self.calls:
                    self._add_call(call, w)

    def content(self, result: HogwildResult) -> str:
        """The answer text: empty with a tool call, the guided JSON, else the run's final text."""
        if self.calls:
            return ""
        if self.guide is not None and (self.guide_done or self.run.done):
            return self.guide.constraint.finish()
        return result.final_text.strip()

    def answer_tokens(self, result: HogwildResult) -> int:
        """Generated tokens that make up the answer: the guided text's, the tool calls' (only sampled
        ones: tokens a grammar forced are not generated), worker 0's whole text in a raw run (it is the
        answer), else the final answer's length in tokens."""
        engine = self.run.engine
        if self.guide is not None and (self.guide_done or self.calls):
            return self.guide.constraint.sampled
        if self.calls:
            return sum(self.call_tokens)
        if result.answer is None:
            return result.workers[0].generated_tokens
        return min(len(engine.encode(result.answer)), result.usage.generated_tokens)

    def timings(self) -> dict[str, float]:
        """Seconds: the whole run from submission, until its prompt and headers were encoded (waiting for
        room in the cache included), and its steps."""
        end = self.finished_at or time.monotonic()
        prefill = self.prefilled_at - self.run.started
        return {"total_s": end - self.run.started, "prefill_s": prefill, "decode_s": end - self.prefilled_at}


def _just_opened(open_call: str | None, new: str) -> bool:
    """The worker's newest text `new` completes a `<tool_call>` opening tag, with nothing but blanks
    after it (`open_call`: the text inside the worker's open call, as the step record reports it)."""
    if open_call is None:
        return False
    tail = OPEN + open_call  # the worker's text ends with it
    stripped = tail.rstrip()
    return stripped.endswith(OPEN) and len(tail) - len(stripped) < len(new)


CallController = _Session


def submit_call(engine: HogwildEngine, spec: CallSpec) -> tuple[RunHandle, CallController]:
    """Submit the call's run; returns its handle and the controller that will hold its outcome."""
    controller = CallController(spec)
    return engine.submit(spec.messages, controller=controller, **spec.options), controller
