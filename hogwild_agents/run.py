"""The lockstep generation loop of one run: N workers, one forward pass per step, one shared cache.

Tokens a worker chooses at step t are fed (written into its block) at step t+1; in that forward every
worker's row carries only its own new tokens, so no prefix is ever re-encoded. Layouts (paper, app. A)
are described in `hogwild_agents.views`.

A run is written as *programs*: generators that yield the rows they need fed (a list of `RowPlan`s,
or `Idle` while every worker waits for a tool) and receive the logits of those rows. A driver does the
forwards: `HogwildRun.step()` drives one step alone (the stepped API for experiments), and the engine's
scheduler drives whole runs, putting the rows of every active run into one forward. Because the run
decides what it feeds and samples with its own generator, its tokens do not depend on which runs share
its forwards.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from hogwild_agents import validation
from hogwild_agents.attention import implementation
from hogwild_agents.cache import HEADERS, SHARED, STEPS, KVPool, RunCache, pages_for
from hogwild_agents.errors import ContextLengthError, InvalidArgumentError
from hogwild_agents.hooks import Hooks, ToolCall, ToolRunner
from hogwild_agents.logits_processing import (
    LogitsProcessorFn,
    LogitsProcessorsArg,
    apply_processors,
    per_worker_processors,
)
from hogwild_agents.plan import ForwardPlan, RowPlan
from hogwild_agents.results import (
    FinishReason,
    HogwildResult,
    RunEvent,
    StepEvent,
    StepRecord,
    TokenEvent,
    TokenSource,
    ToolCallEvent,
    ToolResultEvent,
    TraceEvent,
    Usage,
    WorkerResult,
    WorkerStepEvent,
    WrittenToolCall,
)
from hogwild_agents.sampling import SamplingParams, choose_tokens
from hogwild_agents.script import RunScript
from hogwild_agents.tool_calls import ParsedToolCall, find_tool_calls, open_call_body
from hogwild_agents.views import LAYOUTS, Layout, Segment, n_header_slots, view_length, worker_view

if TYPE_CHECKING:
    from hogwild_agents.engine import HogwildEngine

PARAGRAPH_BREAK = "\n\n"  # what ends a step written by a tool call
WRITE_CHUNK = 256  # tokens per forward of any multi-token write: prompt, injected, forced or tool text
DECODE_CONTEXT = 8  # tokens of left context when decoding a stream's newest text
FINISHER_TOKENS = 32  # tokens the finisher's answer may take
MIN_FORWARD_PASSES = 2  # the smallest forward-pass cap: one step and the forward that feeds its tokens


@dataclass(frozen=True)
class RunLimits:
    """Token budgets of a run. `max_total_tokens` counts sampled tokens over all workers;
    `max_context` caps every worker's view below the model's own context (None: the model's)."""

    max_new_tokens: int = 256
    max_total_tokens: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None  # wall-clock limit of the run; workers then finish with "timeout"
    max_context: int | None = None
    max_forward_passes: int | None = None  # forwards after the prompt, the finisher's answer included

    def __post_init__(self) -> None:
        validation.timeout(self.timeout_s, "timeout_s")
        validation.positive_integer(self.max_new_tokens, "max_new_tokens")
        if self.max_forward_passes is not None:  # one step, and the forward that feeds its tokens
            validation.integer(self.max_forward_passes, "max_forward_passes", MIN_FORWARD_PASSES)
        if self.max_total_tokens is not None:
            validation.positive_integer(self.max_total_tokens, "max_total_tokens")
        if self.max_context is not None:
            validation.positive_integer(self.max_context, "max_context")
        validation.stop_strings(self.stop)


@dataclass(frozen=True)
class Idle:
    """A program's request meaning: nothing to feed now, every worker waits for these tool calls."""

    futures: tuple[Future, ...]
    deadline: float  # time.monotonic() by which the earliest call times out


Request = list[RowPlan] | Idle
T = TypeVar("T")
RunProgram = Generator[Request, Any, T]


class RunController(Protocol):
    """Per-run logic a driver runs between steps (in the thread that drives the run)."""

    def start(self, run: HogwildRun) -> None:
        """Called once the prompt is encoded, before the first step."""

    def after_step(self, run: HogwildRun, record: StepRecord) -> bool:
        """Called after every step; True stops the run at once (the caller has what it needs)."""

    def finish(self, run: HogwildRun, stopped: bool) -> None:
        """Called after the last step (the finisher included); `stopped`: after_step stopped it."""


@dataclass
class WorkerState:
    """A worker's stream and bookkeeping. `pending` tokens are chosen but not yet in the cache."""

    index: int
    name: str
    decode: Callable[[Sequence[int]], str]
    stream: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)
    step_ids: list[int] = field(default_factory=list)
    step_index: int = 1
    generated: int = 0
    budget: int = 0  # generated-token limit of this worker
    since_interjection: int = 0
    forced: list[int] = field(default_factory=list)
    header_due: list[int] = field(default_factory=list)
    closing: bool = False
    waiting: ToolCall | None = None  # the earliest of its tool calls still running
    waiting_calls: list[ToolCall] = field(default_factory=list)  # its tool calls still running, in order
    scan_from: int = 0  # text offset from which to look for the worker's next tool call
    calls: list[WrittenToolCall] = field(default_factory=list)  # every complete tool call it wrote
    open_call: str | None = None  # the text inside its unclosed `<tool_call>`, while one is open
    last_source: TokenSource | None = None  # how its latest tokens were chosen
    finish_reason: FinishReason | None = None
    last_logits: torch.Tensor | None = None
    answering: bool = False  # writing the finisher's answer: no step segmentation, greedy choices
    answer_start: int = 0  # text offset where the finisher's answer begins

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.decode(self.stream)

    def text_delta(self, n_new: int) -> str:
        """Text the last `n_new` stream tokens add (decoded with a few tokens of left context, so that
        characters split across tokens come out whole)."""
        start = max(0, len(self.stream) - n_new - DECODE_CONTEXT)
        before = self.decode(self.stream[start : len(self.stream) - n_new])
        after = self.decode(self.stream[start:])
        return after[len(before) :] if after.startswith(before) else after


class HogwildRun:
    """A run: create with `HogwildEngine.start` (stepped, private cache) or `HogwildEngine.submit`
    (driven by the engine's scheduler)."""

    def __init__(
        self,
        engine: HogwildEngine,
        script: RunScript,
        *,
        layout: Layout = "combined",
        sampling: SamplingParams | None = None,
        limits: RunLimits | None = None,
        attention: str = "fast",
        prompt_ids: Sequence[int] | None = None,
        tool_runner: ToolRunner | None = None,
        owns_tool_runner: bool = False,
        hooks: Hooks | None = None,
        record_views: bool = False,
        logits_processors: LogitsProcessorsArg = None,
        pool: KVPool | None = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
        self.attend = implementation(attention, engine.device)  # fails early when it cannot run here
        self.engine = engine
        self.script = script
        self.tool_runner = tool_runner
        self._owns_tool_runner = owns_tool_runner  # made for this run: `close()` shuts it down
        self._hooks = hooks or Hooks()
        self.tool_calls: list[ToolCall] = []
        self.layout = layout
        self.sampling = sampling or SamplingParams()
        self.limits = limits = limits or RunLimits()
        self.attention = attention
        self.record_views = record_views  # copy each fed worker's whole view into its StepRecord
        self._generator = self.sampling.generator()
        self.started = time.monotonic()
        self.steps_taken = 0
        self.forward_passes = 0  # forwards after the prompt and headers (steps, chunked writes, answers)
        self.forward_tokens = 0
        self.reused_tokens = 0
        self._setup_done = False
        self.trace: list[TraceEvent] = []  # every text a worker chose and every injected block, in order
        self._listeners: list[Callable[[RunEvent], None]] = []
        self._max_positions = min(engine.max_positions, limits.max_context or engine.max_positions)
        n = len(script.worker_names)
        self.workers = [
            WorkerState(i, name, engine.decode, budget=limits.max_new_tokens)
            for i, name in enumerate(script.worker_names)
        ]
        self._concluding = False
        self._logits_processors = per_worker_processors(logits_processors, n)

        prompt = list(prompt_ids) if prompt_ids is not None else engine.encode(script.prompt)
        if not prompt:
            raise ValueError("The prompt is empty; give at least one token of prompt text.")
        self.prompt_tokens = len(prompt)
        self.prompt_ids = prompt
        # header slots: see hogwild_agents.views
        separator = engine.encode(script.others_separator) if layout == "combined" else []
        self._headers = [engine.encode(script.others_header)]
        self._headers += [engine.encode(script.own_header(i)) for i in range(n)] + [separator] * n
        first_steps = [engine.encode(script.step_header(i, 1)) for i in range(n)]
        needed = len(prompt) + max(len(self._headers[1 + i]) + len(first_steps[i]) for i in range(n)) + 1
        if needed > self._max_positions:
            what = "max_context" if self._max_positions < engine.max_positions else "the model's context"
            headers = (
                f" (with the protocol's headers, {needed} to write a first token)"
                if needed > len(prompt) + 1
                else ""
            )
            raise ContextLengthError(
                f"The prompt has {len(prompt)} tokens{headers}, but {what} is {self._max_positions}; "
                "shorten the prompt" + (" or raise max_context." if what == "max_context" else ".")
            )
        self._first_steps = first_steps
        self.pool = pool if pool is not None else engine.new_pool()
        self.cache = RunCache(self.pool, n, n_header_slots(n))
        # a private pool holds this run's reservation (a scheduler's pool: the scheduler reserves)
        self._private_pages = self.reservation_pages if pool is None else 0
        self.pool.reserve(self._private_pages)

    # ---- events --------------------------------------------------------------------------------
    def add_listener(self, listener: Callable[[RunEvent], None]) -> None:
        """Call `listener(event)` for every event of the run (tokens, tool calls and results, steps)."""
        self._listeners.append(listener)

    def _notify(self, event: RunEvent) -> None:
        for listener in self._listeners:
            listener(event)

    # ---- logits processors ---------------------------------------------------------------------
    def logits_processors(self, worker: int) -> list[LogitsProcessorFn]:
        """The worker's logits processors, in the order they run (a copy)."""
        return list(self._logits_processors[worker])

    def set_logits_processors(self, worker: int, processors: Sequence[LogitsProcessorFn]) -> None:
        """Replace the logits processors of one worker (from the next choice on)."""
        self._logits_processors[worker] = list(processors)

    def add_logits_processor(self, worker: int, processor: LogitsProcessorFn) -> None:
        """Run `processor` after the worker's other logits processors (from the next choice on)."""
        self._logits_processors[worker].append(processor)

    def remove_logits_processor(self, worker: int, processor: LogitsProcessorFn) -> None:
        """Stop running `processor` for the worker (added with `add_logits_processor`)."""
        processors = self._logits_processors[worker]
        if not any(p is processor for p in processors):
            raise InvalidArgumentError(
                f"Worker {worker} has no logits processor {processor!r}; remove only one it was given."
            )
        self._logits_processors[worker] = [p for p in processors if p is not processor]

    # ---- views ---------------------------------------------------------------------------------
    def view(self, worker: int) -> list[Segment]:
        """The worker's view as cache blocks, in view order; its own step block last."""
        return worker_view(self.layout, worker, len(self.workers), self.cache.length)

    def _segment_ids(self, segments: Sequence[Segment]) -> list[int]:
        ids: list[int] = []
        for seg in segments:
            ids.extend(self.cache.token_ids(seg.group, seg.slot)[: seg.visible])
        return ids

    def view_token_ids(self, worker: int) -> list[int]:
        """The exact token ids the worker's next forward attends to, in view order (pending included)."""
        return self._segment_ids(self.view(worker)) + self.workers[worker].pending

    def view_length(self, worker: int) -> int:
        return view_length(self.view(worker)) + len(self.workers[worker].pending)

    @property
    def reservation_pages(self) -> int:
        """Cache pages this run is expected to need at most (for a scheduler's admission control)."""
        n = len(self.workers)
        per_worker = min(self.limits.max_new_tokens, self._max_positions)
        sampled = per_worker * n
        if self.limits.max_total_tokens is not None:
            sampled = min(sampled, self.limits.max_total_tokens)
        written = self.prompt_tokens + sum(map(len, self._headers)) + sampled * 5 // 4 + 64 * n
        tokens = min(written, self._max_positions * (n + 1))
        return pages_for(tokens) + 1 + n_header_slots(n) + n

    # ---- driving alone ---------------------------------------------------------------------------
    def _drive(self, program: RunProgram[T], *, wait: bool = True) -> T | None:
        """Run `program` to its end with forwards of this run alone (or, with `wait` False, until it
        would wait for a tool)."""
        value: Any = None
        while True:
            try:
                request = program.send(value)
            except StopIteration as stop:
                return stop.value
            if isinstance(request, Idle):
                if not wait:
                    program.close()
                    return None
                wait_for_first(request)
                value = None
            else:
                value = self.engine.forward(ForwardPlan(request, self.pool), self.attend)

    def setup(self) -> None:
        """Encode the prompt and the headers (alone); `HogwildEngine.start` calls it."""
        if not self._setup_done:
            self._drive(self._setup())

    def step(self) -> StepRecord:
        """Feed every worker's pending tokens in one forward, then let each unfinished worker choose."""
        self.setup()
        if self.done:
            raise RuntimeError("The run has finished; start a new run.")
        return self._drive(self._step())

    def conclude(self, worker: int = 0, max_tokens: int = FINISHER_TOKENS) -> bool:
        """Finish a run that ended without an answer: force the script's finisher into `worker`'s stream
        and let it write the answer (greedily, no step headers) until the answer is complete, a
        paragraph break, or `max_tokens`. Returns True if it ran.

        Drives any unfinished work to the end first. Does nothing when the script has no finisher or a
        worker's text already holds an answer."""
        self.setup()
        return self._drive(self._conclude(worker, max_tokens))

    def poll_tools(self) -> None:
        """Write the results of tool calls that have returned as shared blocks now, without waiting
        (`step()` does this first)."""
        self.setup()
        self._drive(self._poll_tools(), wait=False)

    def inject(self, text_or_ids: str | Sequence[int], kind: str = "inject") -> None:
        """Append a block to the shared history now; every worker's view contains it from the next step.
        Text is encoded as untrusted (marker-like text does not become control tokens)."""
        self.setup()
        ids = self.engine.check_ids_or_encode(text_or_ids, "inject")  # text: untrusted
        if self._shared_room() < len(ids):
            raise ContextLengthError(
                f"The injected block has {len(ids)} tokens but only {self._shared_room()} positions are "
                f"left in the shared history (context {self._max_positions}); inject less."
            )
        self._drive(self._write_shared(ids, kind))

    def force(self, worker: int, token_ids: str | Sequence[int]) -> None:
        """Make `worker` choose these tokens at the next step instead of sampling."""
        state = self.workers[worker]
        if state.finished:
            raise ValueError(
                f"Worker {worker} ({state.name}) has finished ({state.finish_reason}); it takes no tokens."
            )
        state.forced.extend(self.engine.check_ids_or_encode(token_ids, "force"))  # text: untrusted

    # ---- forks and checkpoints ---------------------------------------------------------------------
    def fork(self) -> HogwildRun:
        """An independent copy of the run between two steps: its cache copied into new pages of the
        same pool, its workers' state and its random stream, so that stepping one leaves the other as
        it was. The copy has no hooks or listeners (its logits processors are the same objects); close
        it when done. Refused while a tool call is running."""
        if any(w.waiting_calls for w in self.workers):
            raise RuntimeError("A run cannot be forked while a tool call is running; fork between calls.")
        twin = copy.copy(self)
        twin.cache = self.cache.fork()
        lists = ("stream", "pending", "step_ids", "forced", "header_due", "calls")
        twin.workers = [replace(w, **{name: list(getattr(w, name)) for name in lists}) for w in self.workers]
        twin._generator = torch.Generator()
        twin._generator.set_state(self._generator.get_state())
        twin.trace, twin.tool_calls = list(self.trace), list(self.tool_calls)
        twin._listeners, twin._hooks = [], Hooks()
        twin._owns_tool_runner, twin._private_pages = False, 0
        twin._logits_processors = [list(p) for p in self._logits_processors]
        return twin

    def stops_at(self, cap: int) -> bool:
        """Whether a run capped at `cap` forward passes would have stopped its workers at the step just
        taken: the moment to read its answer at that budget (`answer_at`)."""
        return self._setup_done and not self._concluding and self._forward_cap_near(cap)

    def answer_at(self, cap: int) -> HogwildResult:
        """The result this run would have given with `max_forward_passes=cap`, read on a fork (this run
        goes on unchanged): every worker stops here and the finisher answers inside the cap. Call it
        after the step at which `stops_at(cap)` first holds (then it equals the capped run's result)."""
        twin = self.fork()
        try:
            twin.limits = replace(self.limits, max_forward_passes=cap)
            for worker in twin.workers:
                if not worker.finished:
                    twin._finish(worker, "length")
                    worker.waiting_calls, worker.waiting = [], None
            twin._drive(twin._conclude())
            return twin.result()
        finally:
            twin.close()

    # ---- programs --------------------------------------------------------------------------------
    def program(self, controller: RunController | None = None) -> RunProgram[HogwildResult]:
        """The whole run: prompt, steps until done (or the controller stops it), the finisher, the result."""
        if not self._setup_done:
            yield from self._setup()
        if controller is not None:
            controller.start(self)
        stopped = False
        while not self.done:
            record = yield from self._step()
            if controller is not None and controller.after_step(self, record):
                stopped = True
                break
        if not stopped:
            yield from self._conclude()
        if controller is not None:
            controller.finish(self, stopped)
        self._remember_sequence()
        return self.result()

    def _remember_sequence(self) -> None:
        """A single raw worker's view is the plain sequence prompt + reply, with the very K/V a plain
        forward would give: keep it in the engine's prefix cache (a next turn re-sends it)."""
        script = self.script
        if len(self.workers) != 1 or any(e.worker is None for e in self.trace):
            return
        if script.own_header(0) or script.step_header(0, 1) or script.step_header(0, 2):
            return
        keys, values, ids = [], [], []
        for seg in self.view(0):
            if seg.visible:
                k, v = self.cache.block_kv_all(seg.group, seg.slot, seg.visible)
                if seg.offset and seg.group != SHARED:
                    k = self.cache.rotations.shift_all(k, seg.offset)
                keys.append(k)
                values.append(v)
                ids += self.cache.token_ids(seg.group, seg.slot)[: seg.visible]
        if len(ids) > self.prompt_tokens:
            self.engine.prompt_cache.store_kv(ids, torch.cat(keys, dim=2), torch.cat(values, dim=2))

    def _feed(self, rows: list[RowPlan]) -> RunProgram[torch.Tensor]:
        """One forward over `rows` (pages already reserved); commit their tokens; return the logits."""
        logits = yield rows
        for row in rows:
            self.cache.commit(row.target.group, row.target.slot, row.token_ids)
        self.forward_tokens += sum(len(r.token_ids) for r in rows)
        self.forward_passes += self._setup_done
        return logits

    def _shared_row(self, ids: Sequence[int]) -> RowPlan:
        self.cache.reserve(SHARED, 0, len(ids))
        return RowPlan(tuple(ids), (Segment(SHARED, 0, 0, self.cache.shared_length),), self.cache)

    def _write_shared(self, ids: Sequence[int], kind: str | None) -> RunProgram[torch.Tensor | None]:
        """Append `ids` to the shared block, WRITE_CHUNK tokens per forward; return the last logits."""
        logits = None
        for start in range(0, len(ids), WRITE_CHUNK):
            logits = yield from self._feed([self._shared_row(ids[start : start + WRITE_CHUNK])])
        if kind is not None and ids:
            text = self.engine.decode(ids)
            self.trace.append(TraceEvent(self.steps_taken, None, kind, text))
        return logits

    def _shared_room(self) -> int:
        """Tokens the shared history can still take before some worker's view exceeds the context."""
        longest_rest = max(self.view_length(w.index) for w in self.workers) - self.cache.shared_length
        return max(0, self._max_positions - self.cache.shared_length - max(longest_rest, 1))

    def _setup(self) -> RunProgram[None]:
        prompt = self.prompt_ids
        self.reused_tokens = self.engine.prompt_cache.reuse(prompt, self.cache)
        logits = yield from self._write_shared(prompt[self.reused_tokens :], None)
        for worker in self.workers:
            worker.last_logits = logits[0]
        self.engine.prompt_cache.store(prompt, self.cache)
        shared = Segment(SHARED, 0, 0, self.cache.shared_length)
        rows = []
        for slot, ids in enumerate(self._headers):
            if ids:
                self.cache.reserve(HEADERS, slot, len(ids))
                rows.append(
                    RowPlan(tuple(ids), (shared, Segment(HEADERS, slot, shared.visible, 0)), self.cache)
                )
        if rows:
            yield from self._feed(rows)
        for worker, ids in zip(self.workers, self._first_steps, strict=True):
            worker.pending = list(ids)
            worker.stream.extend(ids)
            worker.step_ids.extend(ids)
            if ids:
                self.trace.append(TraceEvent(0, worker.index, "header", worker.text))
                self._notify(TokenEvent(worker.index, worker.name, worker.text, "header", 0))
        self._setup_done = True

    def _worker_row(self, worker: WorkerState, ids: Sequence[int]) -> RowPlan:
        self.cache.reserve(STEPS, worker.index, len(ids))
        return RowPlan(tuple(ids), tuple(self.view(worker.index)), self.cache)

    def _fit_to_context(self, worker: WorkerState) -> None:
        """Drop pending tokens that would take the worker's view past the context; it then finishes."""
        room = self._max_positions - view_length(self.view(worker.index))
        if len(worker.pending) > room:
            worker.pending = worker.pending[: max(room, 0)]
            if not worker.finished:
                self._finish(worker, "length")
                worker.waiting_calls, worker.waiting = [], None

    @property
    def done(self) -> bool:
        return all(w.finished and not w.pending for w in self.workers)

    def _step(self) -> RunProgram[StepRecord]:
        record = StepRecord(index=self.steps_taken)
        if self.limits.timeout_s is not None and time.monotonic() - self.started > self.limits.timeout_s:
            for w in self.workers:
                if not w.finished:
                    self._finish(w, "timeout")
                    w.waiting_calls, w.waiting = [], None
                    record.finished[w.index] = "timeout"
        yield from self._poll_tools()
        for w in self.workers:
            if w.pending:
                self._fit_to_context(w)
        fed = [w for w in self.workers if w.pending]
        # a long write (forced text) goes in chunks first; the last chunk joins the step's forward
        while any(len(w.pending) > WRITE_CHUNK for w in fed):
            long = [w for w in fed if len(w.pending) > WRITE_CHUNK]
            yield from self._feed([self._worker_row(w, w.pending[:WRITE_CHUNK]) for w in long])
            for w in long:
                w.pending = w.pending[WRITE_CHUNK:]
            record.forward_tokens += WRITE_CHUNK * len(long)
        if fed:
            rows = [self._worker_row(w, w.pending) for w in fed]
            for w, row in zip(fed, rows, strict=True):
                record.view_lengths[w.index] = row.view_length
                if self.record_views:
                    record.views[w.index] = self._segment_ids(row.segments) + w.pending
            logits = yield from self._feed(rows)
            record.forward_tokens += sum(len(r.token_ids) for r in rows)
            for i, w in enumerate(fed):
                w.pending = []
                w.last_logits = logits[i]
                if w.closing:
                    self._close_step(w)
        for w in self.workers:  # a finished worker that fed nothing still hands its step over
            if w.closing and not w.pending and w.finished:
                self._close_step(w)
        self._choose(record)
        self.steps_taken += 1
        if self._hooks.on_step is not None:
            self._hooks.on_step(record)
        self._notify(StepEvent(record))
        return record

    def _close_step(self, worker: WorkerState) -> None:
        """The worker's current step is complete: move it into the shared history, open the next one.
        (In the contiguous layout a worker's whole output is one step, complete when it finishes.)"""
        worker.closing = False
        text = self.engine.decode(worker.step_ids)
        self._notify(WorkerStepEvent(worker.index, worker.name, worker.step_index, text))
        if self.layout == "contiguous":
            return
        if self._hooks.on_step_finished is not None:
            self._hooks.on_step_finished(worker.index, text)
        self.cache.move_to_shared(worker.index)
        worker.step_ids = []
        if not worker.finished and not self._concluding:  # the finisher's answer opens no new step
            worker.step_index += 1
            worker.header_due = self.engine.encode(self.script.step_header(worker.index, worker.step_index))

    def _choose(self, record: StepRecord) -> None:
        running = [w.index for w in self.workers if not w.finished]
        for w in self.workers:  # the others' tokens just fed may have filled a view: no room for one more
            if not w.finished and w.waiting is None and not w.pending and self._at_context_limit(w):
                self._finish(w, "length")
        active = [w for w in self.workers if not w.finished and w.waiting is None]
        to_sample = [w for w in active if not (w.forced or w.header_due or self._interjection_due(w))]
        sampled: dict[int, int] = {}
        greedy = [w for w in to_sample if w.answering]
        free = [w for w in to_sample if not w.answering]
        for group, params in ((free, self.sampling), (greedy, SamplingParams(temperature=0.0))):
            if group:
                logits = torch.stack([self._processed_logits(w) for w in group])
                chosen = choose_tokens(logits, params, self._generator)
                sampled.update(zip((w.index for w in group), chosen, strict=True))
        for w in active:
            if w.finished:  # ended in this step by another worker's final answer
                continue
            record.logits[w.index] = w.last_logits
            if w.forced:
                ids, source, w.forced = w.forced, "forced", []
            elif w.header_due:
                ids, source, w.header_due = w.header_due, "header", []
            elif w.index not in sampled:
                ids, source, w.since_interjection = (
                    self.engine.encode(self.script.interjection),
                    "interjection",
                    0,
                )
            else:
                ids, source = [sampled[w.index]], "sampled"
            record.chosen[w.index], record.sources[w.index] = ids, source
            self._accept(w, ids, source)
            if w.stream[-len(ids) :] == ids:
                self._find_tool_calls(w, record, self._emit(w, record, len(ids), source))
        budget = self.limits.max_total_tokens
        spent = budget is not None and sum(w.generated for w in self.workers) >= budget
        if not self._concluding and (spent or self._forward_cap_near()):
            for w in self.workers:
                if not w.finished:
                    self._finish(w, "length")
                    w.waiting_calls, w.waiting = [], None
        record.finished.update(
            {i: self.workers[i].finish_reason for i in running if self.workers[i].finished}
        )
        record.open_calls.update({w.index: w.open_call for w in self.workers if w.open_call is not None})

    def _emit(self, worker: WorkerState, record: StepRecord, n_new: int, source: TokenSource) -> str:
        """Report the text of the worker's newest `n_new` stream tokens: step record, trace, events."""
        text = worker.text_delta(n_new)
        record.texts[worker.index] = record.texts.get(worker.index, "") + text
        self.trace.append(TraceEvent(record.index, worker.index, source, text))
        if self._hooks.on_token is not None:
            self._hooks.on_token(worker.index, text)
        if text:
            self._notify(TokenEvent(worker.index, worker.name, text, source, record.index))
        return text

    def _processed_logits(self, worker: WorkerState) -> torch.Tensor:
        """The worker's logits after its logits processors (the model's own when it has none)."""
        processors = self._logits_processors[worker.index]
        if not processors:
            return worker.last_logits
        return apply_processors(processors, self.prompt_ids + worker.stream, worker.last_logits, worker.name)

    # ---- tool calls ------------------------------------------------------------------------------
    def _find_tool_calls(self, worker: WorkerState, record: StepRecord, new_text: str) -> None:
        """Find the tool calls the worker completed with `new_text` (the one place calls are found):
        report them in the record, start those of in-engine tools, and keep track of an open call.

        A tag ends with ">", so calls change only when new text holds one (or a call is open)."""
        if ">" not in new_text and worker.open_call is None:
            return
        text = worker.text
        calls = find_tool_calls(text, worker.scan_from)
        if calls:
            worker.scan_from = calls[-1].end
            tools = self.tool_runner.tools if self.tool_runner is not None else {}
            written = [WrittenToolCall(worker.index, call, call.name in tools) for call in calls]
            worker.calls += written
            record.tool_calls.setdefault(worker.index, []).extend(written)
        worker.open_call = open_call_body(text, worker.scan_from)
        if calls and self.tool_runner is not None and not worker.finished:
            self._start_tool_calls(worker, record, calls, text.endswith(PARAGRAPH_BREAK))

    def _start_tool_calls(
        self, worker: WorkerState, record: StepRecord, calls: list[ParsedToolCall], step_ended: bool
    ) -> None:
        """Start the tool calls the worker just completed, in order, and pause it until they return.

        The calls end the worker's step: a paragraph break is written after them (unless `step_ended`:
        already there), so the step joins the history like any other and the results follow as blocks."""
        step = record.index
        if not step_ended:
            ids = self.engine.encode(PARAGRAPH_BREAK)
            worker.pending.extend(ids)
            worker.stream.extend(ids)
            worker.step_ids.extend(ids)
            record.chosen[worker.index] = record.chosen[worker.index] + ids
            self._emit(worker, record, len(ids), "forced")
        worker.forced = []  # text forced after the calls waits for their results no more
        for parsed in calls:
            call = self.tool_runner.submit(parsed, worker.index, worker.name, step)
            self.tool_calls.append(call)
            worker.waiting_calls.append(call)
            label = f"{worker.name} called {parsed.name or '(malformed call)'}: {parsed.raw}"
            self.trace.append(TraceEvent(step, None, "tool_call", label))
            if self._hooks.on_tool_call is not None:
                self._hooks.on_tool_call(call)
            self._notify(ToolCallEvent(call, step, label))
        worker.waiting = worker.waiting_calls[0]
        worker.closing = True  # the step holding the calls joins the history before their results

    def _poll_tools(self) -> RunProgram[None]:
        """Write every finished tool result as a shared block, in call order, and resume callers whose
        calls all returned. When every unfinished worker is waiting for a tool, wait (`Idle`)."""
        while True:
            waiting = [w for w in self.workers if w.waiting_calls and not w.pending]  # calls written
            if not waiting:
                return
            settled = False
            for worker in waiting:
                while worker.waiting_calls and self.tool_runner.poll(worker.waiting_calls[0]):
                    call = worker.waiting_calls.pop(0)
                    yield from self._write_tool_result(call)
                    settled = True
                worker.waiting = worker.waiting_calls[0] if worker.waiting_calls else None
            blocked = all(w.finished or w.waiting_calls for w in self.workers) and not any(
                w.pending for w in self.workers
            )
            if settled or not blocked:
                return
            calls = [w.waiting_calls[0] for w in waiting]
            futures = tuple(c.future for c in calls if c.future is not None)
            deadline = min(c.started + self.tool_runner.timeout_s for c in calls)
            yield Idle(futures, deadline)

    def _write_tool_result(self, call: ToolCall) -> RunProgram[None]:
        block = self.script.tool_result_block(str(call.name), call.worker_name, call.result or "")
        ids = self.engine.encode(block)  # the tool's output (untrusted) cannot forge control tokens
        room = self._shared_room()
        if len(ids) > room:  # the context is nearly full: keep what fits
            ids = ids[:room]
        if ids:
            yield from self._write_shared(ids, "tool_result")
        if self._hooks.on_tool_result is not None:
            self._hooks.on_tool_result(call)
        self._notify(ToolResultEvent(call, self.steps_taken, self.engine.decode(ids)))

    # ---- choosing --------------------------------------------------------------------------------
    def _interjection_due(self, worker: WorkerState) -> bool:
        """Every `interjection_period` sampled tokens, but never right after a step header."""
        return (
            bool(self.script.interjection)
            and not worker.answering
            and worker.since_interjection >= self.script.interjection_period
            and worker.last_source == "sampled"
        )

    def _accept(self, worker: WorkerState, ids: list[int], source: TokenSource) -> None:
        worker.last_source = source
        if source == "sampled" and ids[0] in self.engine.eos_token_ids:
            self._finish(worker, "stop")
            return
        worker.pending.extend(ids)
        worker.stream.extend(ids)
        worker.step_ids.extend(ids)
        if source == "sampled":
            worker.generated += 1
            worker.since_interjection += 1
        if worker.answering:
            if source == "sampled" and self._answer_complete(worker):
                self._finish(worker, "stop")
            elif worker.generated >= worker.budget or self._at_context_limit(worker):
                self._finish(worker, "length")
            return
        if source in ("sampled", "forced") and self._gave_answer(worker):
            self._finish(worker, "stop")
            if not self._concluding:  # the first final answer ends the work for everyone
                for other in self.workers:
                    if not other.finished:
                        self._finish(other, "stop")
        elif self._hit_stop_string(worker):
            self._finish(worker, "stop")
        elif worker.generated >= worker.budget or self._at_context_limit(worker):
            self._finish(worker, "length")
        elif (
            source != "header"
            and self.layout != "contiguous"
            and self.script.is_step_end(self.engine.decode(worker.step_ids))
        ):
            worker.closing = True

    def _forward_cap_near(self, cap: int | None = None) -> bool:
        """Only the forwards that end the run are left under `cap` (default `max_forward_passes`): one
        that feeds the tokens just chosen and, with a finisher, the forced finisher and its answer."""
        cap = self.limits.max_forward_passes if cap is None else cap
        if cap is None:
            return False
        ending = 1 + (1 + FINISHER_TOKENS if self.script.finisher else 0)
        return self.forward_passes + ending >= cap

    def _answer_complete(self, worker: WorkerState) -> bool:
        """The finisher's answer ends at a complete answer, a paragraph break or a stop string."""
        text = worker.text
        return (
            self.script.extract_answer(text) is not None
            or PARAGRAPH_BREAK in text[worker.answer_start :]
            or self._hit_stop_string(worker)
        )

    def _at_context_limit(self, worker: WorkerState) -> bool:
        # a view is a subset of the stored blocks plus the pending tokens: check that bound first
        if self.cache.tokens_stored + len(worker.pending) < self._max_positions:
            return False
        return self.view_length(worker.index) >= self._max_positions

    def _gave_answer(self, worker: WorkerState) -> bool:
        """True when the worker's newest token completes a final answer the protocol recognises."""
        tail = self.engine.decode(worker.stream[-2:])
        if "}" not in tail and "\n" not in tail:
            return False
        return self.script.extract_answer(worker.text) is not None

    def _hit_stop_string(self, worker: WorkerState) -> bool:
        if not self.limits.stop:
            return False
        window = max(len(s) for s in self.limits.stop) + 8
        tail = self.engine.decode(worker.stream[-window:])
        return any(s in tail for s in self.limits.stop)

    def _finish(self, worker: WorkerState, reason: FinishReason) -> None:
        worker.finish_reason = reason
        worker.closing = True  # its last tokens are still fed, then its block joins the history
        worker.forced, worker.header_due = [], []

    def cancel(self) -> None:
        """Mark every unfinished worker "cancelled" (a driver stopped the run between two steps)."""
        for worker in self.workers:
            if not worker.finished:
                worker.finish_reason = "cancelled"
            worker.pending = []

    def close(self) -> None:
        """Release what the run holds: its cache pages and a tool runner made for it."""
        if self.tool_runner is not None and self._owns_tool_runner:
            self.tool_runner.close()
        self.cache.release()
        self.pool.unreserve(self._private_pages)
        self._private_pages = 0
        for worker in self.workers:
            worker.last_logits = None

    def _conclude(self, worker: int = 0, max_tokens: int = FINISHER_TOKENS) -> RunProgram[bool]:
        while not self.done:
            yield from self._step()
        if not self.script.finisher or any(self.script.extract_answer(w.text) for w in self.workers):
            return False
        if any(w.finish_reason in ("timeout", "cancelled") for w in self.workers):
            return False  # out of time: no more decoding
        state = self.workers[worker]
        if self.view_length(worker) + len(self.engine.encode(self.script.finisher)) + 1 > self._max_positions:
            return False  # no room left for the answer
        cap = self.limits.max_forward_passes
        if cap is not None:  # an answer of m tokens takes m + 1 forwards (the finisher's, m - 1, the last)
            max_tokens = min(max_tokens, cap - self.forward_passes - 1)
            if max_tokens < 1:
                return False
        self._concluding = True
        state.finish_reason = None
        state.answering = True
        state.header_due = []
        state.budget = state.generated + max_tokens
        state.forced = self.engine.encode(self.script.finisher)
        state.answer_start = len(self.engine.decode(state.stream + state.forced))
        while not self.done:
            yield from self._step()
        return True

    # ---- results -------------------------------------------------------------------------------
    def _worker_text(self, worker: int) -> str:
        """The worker's stream as text, cut at the first stop string."""
        text = self.workers[worker].text
        for stop in self.limits.stop:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text

    def _final_text(self, answer: str | None) -> str:
        """The answer; else the finisher's unfinished answer; else (no protocol) worker 0's text."""
        if answer is not None:
            return answer
        for w in self.workers:
            if w.answering:
                return w.text[w.answer_start :].split(PARAGRAPH_BREAK)[0].strip()
        if not self.script.finisher:
            return self._worker_text(0)
        return ""

    def result(self) -> HogwildResult:
        workers = [
            WorkerResult(
                name=w.name,
                text=self._worker_text(w.index),
                token_ids=list(w.stream),
                generated_tokens=w.generated,
                finish_reason=w.finish_reason,
                steps=w.step_index,
            )
            for w in self.workers
        ]
        answer = None
        for w in workers:
            answer = self.script.extract_answer(w.text) or answer
        reasons = {w.finish_reason for w in self.workers}
        return HogwildResult(
            final_text=self._final_text(answer),
            answer=answer,
            workers=workers,
            shared_text=self.engine.decode(self.cache.token_ids(SHARED)),
            usage=Usage(
                self.prompt_tokens,
                sum(w.generated for w in self.workers),
                self.forward_tokens,
                self.reused_tokens,
            ),
            steps=self.steps_taken,
            finish_reason=next((r for r in ("cancelled", "timeout", "length") if r in reasons), "stop"),
            trace=list(self.trace),
            forward_passes=self.forward_passes,
        )


def wait_for_first(idle: Idle) -> None:
    """Block until one of the idle request's tool calls returns or the earliest deadline passes."""
    from concurrent.futures import FIRST_COMPLETED, wait

    remaining = max(0.0, idle.deadline - time.monotonic())
    if idle.futures:
        wait(idle.futures, timeout=remaining, return_when=FIRST_COMPLETED)
    else:
        time.sleep(min(remaining, 0.01))
