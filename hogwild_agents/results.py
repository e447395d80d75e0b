"""What a run reports: per-step records, live events and the final result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from hogwild_agents.tool_calls import ParsedToolCall

if TYPE_CHECKING:
    from hogwild_agents.hooks import ToolCall

# "stop": EOS, a stop string or a final answer; "length": a token budget or the context; "timeout";
# "cancelled": the caller stopped the run
FinishReason = Literal["stop", "length", "timeout", "cancelled"]
# a chat reply's: its run's, or "tool_calls" when the reply is tool calls for the caller to run
ReplyFinishReason = FinishReason | Literal["tool_calls"]
# how a worker's tokens of a step were chosen: sampled from its logits, forced from outside (run.force,
# the finisher, a grammar's only choice), a step header, or a periodic interjection
TokenSource = Literal["sampled", "forced", "header", "interjection"]


@dataclass(frozen=True)
class WrittenToolCall:
    """A complete tool call a worker wrote. `in_engine`: it names one of the run's in-engine tools, so
    the run runs it (its result becomes a shared block) and the caller must not; otherwise (a tool the
    caller bound, an unknown name, a malformed call) it is the caller's to handle. `call.start` and
    `call.end` locate it in the worker's text (`HogwildRun.workers[worker].text`)."""

    worker: int
    call: ParsedToolCall
    in_engine: bool


@dataclass
class StepRecord:
    """One lockstep step: what each worker saw and chose.

    Attributes:
        index: step number, from 0.
        logits: worker -> next-token logits [vocab] (fp32) for every worker that chose this step.
        chosen: worker -> token ids it chose (one sampled token, or forced/header/interjection ids).
        sources: worker -> how its tokens were chosen ("sampled", "forced", "header" or "interjection").
        texts: worker -> the text its chosen tokens add to its stream.
        view_lengths: worker -> length of the view that worker's forward attended to (new tokens included).
        views: worker -> the exact token ids of that view, in view order; filled only when the run was
            started with `record_views=True` (it copies every view, every step).
        forward_tokens: tokens the model processed in this step (the rows' new tokens, nothing else).
        finished: workers that finished in this step, with their finish reasons.
        tool_calls: worker -> the complete tool calls it wrote in this step, in order (the run finds
            them once, for in-engine tools and for callers alike).
        open_calls: worker -> the text written so far inside its unclosed `<tool_call>` (after the
            tag), for every worker with one open at the end of the step.
    """

    index: int
    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    chosen: dict[int, list[int]] = field(default_factory=dict)
    sources: dict[int, TokenSource] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    view_lengths: dict[int, int] = field(default_factory=dict)
    views: dict[int, list[int]] = field(default_factory=dict)
    forward_tokens: int = 0
    finished: dict[int, FinishReason] = field(default_factory=dict)
    tool_calls: dict[int, list[WrittenToolCall]] = field(default_factory=dict)
    open_calls: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TraceEvent:
    """One entry of a run's timeline: text a worker chose, or a block injected into the history."""

    step: int
    worker: int | None  # None for blocks every worker sees (injections, tool results)
    kind: str  # a TokenSource, "tool_call", "tool_result", or an injected block's kind ("inject", ...)
    text: str


@dataclass(frozen=True)
class WorkerResult:
    name: str
    text: str  # everything in the worker's stream (step headers and interjections included)
    token_ids: list[int]
    generated_tokens: int  # sampled tokens only
    finish_reason: FinishReason | None
    steps: int  # step blocks the worker opened


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int  # the shared prompt, counted once
    generated_tokens: int  # sampled by all workers together
    forward_tokens: int  # every token the model processed (prompt, headers, generated, injected)
    reused_tokens: int = 0  # prompt tokens taken from the engine's prefix cache (not processed)

    @property
    def tokens_after_prompt(self) -> int:
        """Tokens the model processed beyond the prompt's prefill (headers, generated, injected)."""
        return self.forward_tokens - (self.prompt_tokens - self.reused_tokens)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens


@dataclass(frozen=True)
class HogwildResult:
    """The outcome of a run. `final_text` is what a chat model returns."""

    final_text: str
    answer: str | None  # the extracted final answer, when the protocol found one
    workers: list[WorkerResult]
    shared_text: str  # the prompt plus the shared history, as the cache holds it
    usage: Usage
    steps: int
    finish_reason: FinishReason
    trace: list[TraceEvent] = field(default_factory=list)
    forward_passes: int = 0  # forwards after the prompt and headers: steps, chunked writes, the finisher


@dataclass(frozen=True)
class TokenEvent:
    """Text a worker chose in a step (sampled, forced, a header or an interjection)."""

    worker: int
    name: str
    text: str
    source: TokenSource
    step: int


@dataclass(frozen=True)
class ToolCallEvent:
    """A worker completed an in-engine tool call; it runs while the others keep writing."""

    call: ToolCall
    step: int
    text: str  # "<worker> called <tool>: <call>"


@dataclass(frozen=True)
class ToolResultEvent:
    """An in-engine tool call returned; its result is now a shared block every worker sees."""

    call: ToolCall
    step: int
    text: str  # the shared block's text


@dataclass(frozen=True)
class WorkerStepEvent:
    """A worker's step is complete (it joins the shared history), or its last text when it finished."""

    worker: int
    name: str
    step: int  # the worker's step number, from 1
    text: str


@dataclass(frozen=True)
class StepEvent:
    """A lockstep step finished."""

    record: StepRecord


RunEvent = TokenEvent | ToolCallEvent | ToolResultEvent | WorkerStepEvent | StepEvent
