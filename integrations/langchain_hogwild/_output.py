"""A call's outcome as AIMessage fields: content, tool calls, transcripts, metadata, usage."""

from __future__ import annotations

from typing import Any

from langchain_core.messages.ai import UsageMetadata

from hogwild_agents.results import ReplyFinishReason
from langchain_hogwild._driver import Outcome
from langchain_hogwild._tools import to_langchain_calls


def transcripts(outcome: Outcome) -> str:
    """Every worker's text, each under its name."""
    return "\n\n".join(f"[{w.name}]\n{w.text.strip()}" for w in outcome.result.workers)


def usage(outcome: Outcome) -> UsageMetadata:
    """Input tokens counted once (the shared prompt), output tokens over all workers; of those, the
    ones that are not the answer (or tool call) are reasoning."""
    counts = outcome.result.usage
    return UsageMetadata(
        input_tokens=counts.prompt_tokens,
        output_tokens=counts.generated_tokens,
        total_tokens=counts.prompt_tokens + counts.generated_tokens,
        input_token_details={"cache_read": outcome.reused_tokens},
        output_token_details={"reasoning": max(0, counts.generated_tokens - outcome.answer_tokens)},
    )


def finish_reason(outcome: Outcome) -> ReplyFinishReason:
    return "tool_calls" if outcome.tool_calls else outcome.result.finish_reason


def response_metadata(
    outcome: Outcome, settings: dict[str, Any], *, reasoning: bool = True
) -> dict[str, Any]:
    """Model settings, timings and per-worker results (steps, finish reasons, tokens, and each
    worker's text when `reasoning`)."""
    result = outcome.result
    workers = []
    for w in result.workers:
        worker = {"name": w.name, "steps": w.steps, "finish_reason": w.finish_reason}
        if reasoning:
            worker["text"] = w.text
        workers.append({**worker, "generated_tokens": w.generated_tokens})
    return {
        **settings,
        "finish_reason": finish_reason(outcome),
        "steps": result.steps,
        "tool_call_worker": outcome.tool_worker,
        "reused_prompt_tokens": outcome.reused_tokens,
        "timings": dict(outcome.timings),
        "workers": workers,
    }


def message_fields(outcome: Outcome, settings: dict[str, Any], *, reasoning: bool = True) -> dict[str, Any]:
    """Keyword arguments for AIMessage / AIMessageChunk; the workers' transcripts only with `reasoning`."""
    calls, invalid = to_langchain_calls(outcome.tool_calls)
    return {
        "content": outcome.content,
        "additional_kwargs": {"reasoning_content": transcripts(outcome)} if reasoning else {},
        "response_metadata": response_metadata(outcome, settings, reasoning=reasoning),
        "usage_metadata": usage(outcome),
        "tool_calls": calls,
        "invalid_tool_calls": invalid,
    }
