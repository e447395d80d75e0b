"""The lockstep generation loop: N workers, one forward pass per step, one shared cache.

Tokens a worker chooses at step t are fed (written into its block) at step t+1; in that forward every
worker's row carries only its own new tokens, so no prefix is ever re-encoded. Layouts (paper, app. A):

- ``contiguous``: [prompt + injected, other workers' blocks..., own block]; each worker writes one block.
- ``interleaved``: [prompt + history, own header, own current step]; finished steps join the history
  in completion order; others' in-progress steps are not visible.
- ``combined`` (default): [prompt + history, others header, others' current steps..., own header,
  own current step].
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hogwild_agents import validation
from hogwild_agents.attention import implementation
from hogwild_agents.cache import HEADERS, SHARED, STEPS, KVShape, SharedKVCache
from hogwild_agents.errors import ContextLengthError
from hogwild_agents.hooks import Hooks, ToolCall, ToolRunner
from hogwild_agents.logits_processing import LogitsProcessorsArg, apply_processors, per_worker_processors
from hogwild_agents.plan import ForwardPlan, RowPlan, Segment
from hogwild_agents.results import HogwildResult, StepRecord, TraceEvent, Usage, WorkerResult
from hogwild_agents.sampling import SamplingParams, choose_tokens
from hogwild_agents.script import RunScript
from hogwild_agents.tool_calls import CLOSE, find_tool_call

if TYPE_CHECKING:
    from hogwild_agents.engine import HogwildEngine

PARAGRAPH_BREAK = "\n\n"  # what ends a step written by a tool call
LAYOUTS = ("contiguous", "interleaved", "combined")
PREFILL_CHUNK = 512  # prompt tokens per forward while prefilling
DECODE_CONTEXT = 8  # tokens of left context when decoding a stream's newest text


@dataclass(frozen=True)
class RunLimits:
    """Token budgets of a run. `max_total_tokens` counts sampled tokens over all workers."""

    max_new_tokens: int = 256
    max_total_tokens: int | None = None
    stop: tuple[str, ...] = ()
    timeout_s: float | None = None  # wall-clock limit of the run; workers then finish with "timeout"

    def __post_init__(self) -> None:
        validation.timeout(self.timeout_s, "timeout_s")
        validation.positive_integer(self.max_new_tokens, "max_new_tokens")
        if self.max_total_tokens is not None:
            validation.positive_integer(self.max_total_tokens, "max_total_tokens")
        validation.stop_strings(self.stop)


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
    waiting: ToolCall | None = None  # a tool call of this worker still running
    scan_from: int = 0  # text offset from which to look for the worker's next tool call
    last_source: str = ""  # how its latest tokens were chosen
    finish_reason: str | None = None
    last_logits: torch.Tensor | None = None

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
    """A run in progress. Create with `HogwildEngine.start`; drive with `step()` or `generate` it."""

    def __init__(
        self,
        engine: HogwildEngine,
        script: RunScript,
        *,
        layout: str = "combined",
        sampling: SamplingParams | None = None,
        limits: RunLimits | None = None,
        attention: str = "fast",
        prompt_ids: Sequence[int] | None = None,
        tool_runner: ToolRunner | None = None,
        owns_tool_runner: bool = False,
        hooks: Hooks | None = None,
        record_views: bool = False,
        logits_processors: LogitsProcessorsArg = None,
    ) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
        self.attend = implementation(attention, engine.device)  # fails early when it cannot run here
        self.engine = engine
        self.script = script
        self.tool_runner = tool_runner
        self.owns_tool_runner = owns_tool_runner  # made for this run: `close()` shuts it down
        self.hooks = hooks or Hooks()
        self.tool_calls: list[ToolCall] = []
        self.layout = layout
        sampling = sampling or SamplingParams()
        limits = limits or RunLimits()
        self.sampling = sampling
        self.limits = limits
        self.attention = attention
        self.record_views = record_views  # copy each fed worker's whole view into its StepRecord
        self.generator = sampling.generator()
        self.started = time.monotonic()
        self.steps_taken = 0
        self.forward_tokens = 0
        self.trace: list[TraceEvent] = []  # every text a worker chose and every injected block, in order
        n = len(script.worker_names)
        self.workers = [
            WorkerState(i, name, engine.decode, budget=limits.max_new_tokens)
            for i, name in enumerate(script.worker_names)
        ]
        self.concluding = False
        self.logits_processors = per_worker_processors(logits_processors, n)

        prompt = list(prompt_ids) if prompt_ids is not None else engine.encode(script.prompt)
        if not prompt:
            raise ValueError("The prompt is empty; give at least one token of prompt text.")
        self.prompt_tokens = len(prompt)
        self.prompt_ids = prompt
        if len(prompt) >= engine.max_positions:
            raise ContextLengthError(
                f"The prompt has {len(prompt)} tokens but the model's context is {engine.max_positions}; "
                "shorten the prompt."
            )
        # header slots: 0 others' header, 1..n own headers, n+1..2n the separator before worker i's step
        separator = engine.encode(script.others_separator) if layout == "combined" else []
        headers = [engine.encode(script.others_header)]
        headers += [engine.encode(script.own_header(i)) for i in range(n)] + [separator] * n
        reserve = len(prompt) + (limits.max_total_tokens or limits.max_new_tokens * n) + 64
        self.cache = SharedKVCache(
            KVShape(engine.n_layers, engine.kv_heads, engine.head_dim, engine.dtype, engine.device),
            engine.rotations,
            n_workers=n,
            n_headers=2 * n + 1,
            shared_capacity=min(reserve, engine.max_positions),
            step_capacity=limits.max_new_tokens + 16 if layout == "contiguous" else 64,
            header_capacity=max(len(h) for h in headers) or 1,
        )
        self._prefill(prompt, headers)
        for worker in self.workers:
            worker.pending = engine.encode(script.step_header(worker.index, 1))
            worker.stream.extend(worker.pending)
            worker.step_ids.extend(worker.pending)
            if worker.pending:
                self.trace.append(TraceEvent(0, worker.index, "header", worker.text))

    # ---- views ---------------------------------------------------------------------------------
    def _segments(self, worker: int) -> list[Segment]:
        """The worker's view as cache blocks, in view order; its own step block last."""
        cache = self.cache
        segments = [Segment(SHARED, 0, 0, cache.shared_length)]
        offset = cache.shared_length

        def add(group: int, slot: int) -> None:
            nonlocal offset
            length = cache.length(group, slot)
            if length or (group == STEPS and slot == worker):
                segments.append(Segment(group, slot, offset, length))
                offset += length

        n = len(self.workers)
        if self.layout == "combined":
            add(HEADERS, 0)
        if self.layout in ("combined", "contiguous"):
            first = True
            for other in range(n):
                if other != worker and cache.length(STEPS, other):
                    if not first:
                        add(HEADERS, 1 + n + other)  # separator between two steps in progress
                    add(STEPS, other)
                    first = False
        if self.layout in ("combined", "interleaved"):
            add(HEADERS, 1 + worker)
        add(STEPS, worker)
        return segments

    def _segment_ids(self, segments: Sequence[Segment]) -> list[int]:
        ids: list[int] = []
        for seg in segments:
            ids.extend(self.cache.token_ids(seg.group, seg.slot)[: seg.visible])
        return ids

    def view_token_ids(self, worker: int) -> list[int]:
        """The exact token ids the worker's next forward attends to, in view order (pending included)."""
        return self._segment_ids(self._segments(worker)) + self.workers[worker].pending

    def view_length(self, worker: int) -> int:
        return sum(s.visible for s in self._segments(worker)) + len(self.workers[worker].pending)

    # ---- forward passes ------------------------------------------------------------------------
    def _forward(self, rows: list[RowPlan]) -> torch.Tensor:
        """Run one forward over `rows` (capacity already reserved); store K/V; return last logits."""
        plan = ForwardPlan(rows, self.cache, self.engine.dtype)
        logits = self.engine.forward(plan, self.attend)
        for row in rows:
            self.cache.commit(row.target.group, row.target.slot, list(row.token_ids))
        self.forward_tokens += sum(len(r.token_ids) for r in rows)
        return logits

    def _prefill(self, prompt: list[int], headers: list[list[int]]) -> None:
        self.reused_tokens = self._reuse_prefix(prompt)
        for start in range(self.reused_tokens, len(prompt), PREFILL_CHUNK):
            chunk = prompt[start : start + PREFILL_CHUNK]
            self.cache.reserve(SHARED, 0, len(chunk))
            logits = self._forward(
                [RowPlan(tuple(chunk), (Segment(SHARED, 0, 0, self.cache.shared_length),))]
            )
        for worker in self.workers:
            worker.last_logits = logits[0]
        self.engine.prompt_cache.store(prompt, self.cache)
        shared = Segment(SHARED, 0, 0, self.cache.shared_length)
        rows = [
            RowPlan(tuple(ids), (shared, Segment(HEADERS, slot, shared.visible, 0)))
            for slot, ids in enumerate(headers)
            if ids
        ]
        if rows:
            self._forward(rows)

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Copy the K/V of the longest prompt prefix the engine's previous run encoded; return its length.

        At least the last prompt token is always encoded again, for the logits of the first step."""
        reused = self.engine.prompt_cache.common_prefix(prompt, limit=len(prompt) - 1)
        if reused:
            self.engine.prompt_cache.copy_into(self.cache, prompt[:reused])
        return reused

    def inject(self, text_or_ids: str | Sequence[int], kind: str = "inject") -> None:
        """Append a block to the shared history; every worker's view contains it from the next step."""
        ids = self.engine.check_ids_or_encode(text_or_ids, "inject")  # text: untrusted, markers split
        if not ids:
            return
        self.cache.reserve(SHARED, 0, len(ids))
        self._forward([RowPlan(tuple(ids), (Segment(SHARED, 0, 0, self.cache.shared_length),))])
        self.trace.append(TraceEvent(self.steps_taken, None, kind, self.engine.decode(ids)))

    def force(self, worker: int, token_ids: str | Sequence[int]) -> None:
        """Make `worker` choose these tokens at the next step instead of sampling."""
        state = self.workers[worker]
        if state.finished:
            raise ValueError(
                f"Worker {worker} ({state.name}) has finished ({state.finish_reason}); it takes no tokens."
            )
        ids = self.engine.check_ids_or_encode(token_ids, "force")  # text: untrusted, markers split
        state.forced.extend(ids)

    # ---- the step ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return all(w.finished and not w.pending for w in self.workers)

    def step(self) -> StepRecord:
        """Feed every worker's pending tokens in one forward, then let each unfinished worker choose."""
        if self.done:
            raise RuntimeError("The run has finished; start a new run.")
        record = StepRecord(index=self.steps_taken)
        if self.limits.timeout_s is not None and time.monotonic() - self.started > self.limits.timeout_s:
            for w in self.workers:
                if not w.finished:
                    self._finish(w, "timeout")
                    w.waiting = None
                    record.finished[w.index] = "timeout"
        self.poll_tools()
        fed = [w for w in self.workers if w.pending]
        if fed:
            for w in fed:
                self.cache.reserve(STEPS, w.index, len(w.pending))
            rows = [RowPlan(tuple(w.pending), tuple(self._segments(w.index))) for w in fed]
            for w, row in zip(fed, rows, strict=True):
                record.view_lengths[w.index] = row.view_length
                if self.record_views:
                    record.views[w.index] = self._segment_ids(row.segments) + w.pending
            logits = self._forward(rows)
            record.forward_tokens = sum(len(r.token_ids) for r in rows)
            for i, w in enumerate(fed):
                w.pending = []
                w.last_logits = logits[i]
                if w.closing:
                    self._close_step(w)
        self._choose(record)
        self.steps_taken += 1
        if self.hooks.on_step is not None:
            self.hooks.on_step(record)
        return record

    def _close_step(self, worker: WorkerState) -> None:
        """The worker's current step is complete: move it into the shared history, open the next one."""
        worker.closing = False
        if self.layout == "contiguous":
            return
        if self.hooks.on_step_finished is not None:
            self.hooks.on_step_finished(worker.index, self.engine.decode(worker.step_ids))
        self.cache.move_to_shared(worker.index)
        worker.step_ids = []
        if not worker.finished:
            worker.step_index += 1
            worker.header_due = self.engine.encode(self.script.step_header(worker.index, worker.step_index))

    def _choose(self, record: StepRecord) -> None:
        running = [w.index for w in self.workers if not w.finished]
        active = [w for w in self.workers if not w.finished and w.waiting is None]
        to_sample = [w for w in active if not (w.forced or w.header_due or self._interjection_due(w))]
        sampled = {}
        if to_sample:
            logits = torch.stack([self._processed_logits(w) for w in to_sample])
            sampled = dict(
                zip(
                    (w.index for w in to_sample),
                    choose_tokens(logits, self.sampling, self.generator),
                    strict=True,
                )
            )
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
                text = self._emit(w, record, len(ids), source)
                if self.tool_runner is not None and ">" in text and not w.finished:
                    self._start_tool_call(w, record)
        budget = self.limits.max_total_tokens
        if budget is not None and not self.concluding and sum(w.generated for w in self.workers) >= budget:
            for w in self.workers:
                if not w.finished:
                    self._finish(w, "length")
        record.finished = {i: self.workers[i].finish_reason for i in running if self.workers[i].finished}

    def _emit(self, worker: WorkerState, record: StepRecord, n_new: int, source: str) -> str:
        """Report the text of the worker's newest `n_new` stream tokens: step record, trace, on_token."""
        text = worker.text_delta(n_new)
        record.texts[worker.index] = record.texts.get(worker.index, "") + text
        self.trace.append(TraceEvent(record.index, worker.index, source, text))
        if self.hooks.on_token is not None:
            self.hooks.on_token(worker.index, text)
        return text

    def _processed_logits(self, worker: WorkerState) -> torch.Tensor:
        """The worker's logits after its logits processors (the model's own when it has none)."""
        processors = self.logits_processors[worker.index]
        if not processors:
            return worker.last_logits
        return apply_processors(processors, self.prompt_ids + worker.stream, worker.last_logits, worker.name)

    def _start_tool_call(self, worker: WorkerState, record: StepRecord) -> None:
        """If the worker just completed a tool call, start it and pause the worker until it returns.

        The call ends the worker's step: a paragraph break is written after it (unless already there),
        so the step joins the history like any other and the result follows as its own block."""
        text = worker.text
        if CLOSE not in text[worker.scan_from :]:
            return
        match = find_tool_call(text, worker.scan_from)
        if match is None:
            return
        step = record.index
        if not text.endswith(PARAGRAPH_BREAK):
            ids = self.engine.encode(PARAGRAPH_BREAK)
            worker.pending.extend(ids)
            worker.stream.extend(ids)
            worker.step_ids.extend(ids)
            record.chosen[worker.index] = record.chosen[worker.index] + ids
            self._emit(worker, record, len(ids), "forced")
        worker.scan_from = match.end
        call = self.tool_runner.submit(match, worker.index, worker.name, step)
        self.tool_calls.append(call)
        worker.waiting = call
        worker.closing = True  # the step holding the call joins the history before its result
        label = f"{worker.name} called {match.name or '(malformed call)'}: {match.raw}"
        self.trace.append(TraceEvent(step, None, "tool_call", label))
        if self.hooks.on_tool_call is not None:
            self.hooks.on_tool_call(call)

    def poll_tools(self) -> None:
        """Inject every finished tool result as a shared block and resume its caller. When every
        unfinished worker is waiting for a tool, wait for the earliest call."""
        waiting = [w for w in self.workers if w.waiting is not None and not w.pending]  # call written
        if not waiting:
            return
        blocked = all(w.finished or w.waiting is not None for w in self.workers) and not any(
            w.pending for w in self.workers
        )
        for i, worker in enumerate(waiting):
            call = worker.waiting
            if not self.tool_runner.poll(call, wait=blocked and i == 0):
                continue
            block = self.script.tool_result_block(str(call.name), call.worker_name, call.result)
            self.inject(self.engine.encode(block), kind="tool_result")  # the tool's text stays plain text
            worker.waiting = None
            if self.hooks.on_tool_result is not None:
                self.hooks.on_tool_result(call)

    def _interjection_due(self, worker: WorkerState) -> bool:
        """Every `interjection_period` sampled tokens, but never right after a step header."""
        return (
            bool(self.script.interjection)
            and worker.since_interjection >= self.script.interjection_period
            and worker.last_source == "sampled"
        )

    def _accept(self, worker: WorkerState, ids: list[int], source: str) -> None:
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
        if source in ("sampled", "forced") and self._gave_answer(worker):
            self._finish(worker, "stop")
            if not self.concluding:  # the first final answer ends the work for everyone
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

    def _at_context_limit(self, worker: WorkerState) -> bool:
        # a view is a subset of the stored blocks plus the pending tokens: check that bound first
        limit = self.engine.max_positions
        if self.cache.tokens_stored + len(worker.pending) < limit:
            return False
        return self.view_length(worker.index) >= limit

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

    def _finish(self, worker: WorkerState, reason: str) -> None:
        worker.finish_reason = reason
        worker.closing = True  # its last tokens are still fed, then its block joins the history
        worker.forced, worker.header_due = [], []

    def close(self) -> None:
        """Release what the run made for itself (the thread pool of a tool runner built for it)."""
        if self.tool_runner is not None and self.owns_tool_runner:
            self.tool_runner.close()

    def conclude(self, worker: int = 0, max_tokens: int = 64) -> bool:
        """Finish a run that ended without an answer: force the script's finisher into `worker`'s stream
        and decode greedily until an answer is complete, a stop, or `max_tokens`. Returns True if it ran.

        Drives any unfinished work to the end first. Does nothing when the script has no finisher or a
        worker's text already holds an answer."""
        while not self.done:
            self.step()
        if not self.script.finisher or any(self.script.extract_answer(w.text) for w in self.workers):
            return False
        if any(w.finish_reason == "timeout" for w in self.workers):
            return False  # out of time: no more decoding
        state = self.workers[worker]
        self.concluding = True
        self.sampling = SamplingParams(temperature=0.0)
        state.finish_reason = None
        state.budget = state.generated + max_tokens
        state.forced = self.engine.encode(self.script.finisher)
        while not self.done:
            self.step()
        return True

    # ---- results -------------------------------------------------------------------------------
    def worker_text(self, worker: int) -> str:
        """The worker's stream as text, cut at the first stop string."""
        text = self.workers[worker].text
        for stop in self.limits.stop:
            cut = text.find(stop)
            if cut >= 0:
                text = text[:cut]
        return text

    def result(self) -> HogwildResult:
        workers = [
            WorkerResult(
                name=w.name,
                text=self.worker_text(w.index),
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
            final_text=answer if answer is not None else workers[0].text,
            answer=answer,
            workers=workers,
            shared_text=self.engine.decode(self.cache.token_ids(SHARED)),
            usage=Usage(self.prompt_tokens, sum(w.generated for w in self.workers), self.forward_tokens),
            steps=self.steps_taken,
            finish_reason=next((r for r in ("timeout", "length") if r in reasons), "stop"),
            trace=list(self.trace),
        )
