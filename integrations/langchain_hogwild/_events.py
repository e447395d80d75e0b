"""Per-worker token events, sent as LangChain custom events of the chat model's own run."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.callbacks.manager import ahandle_event, handle_event

from hogwild_agents.results import RunEvent, TokenEvent, ToolCallEvent, ToolResultEvent

TOKEN_EVENT = "hogwild_token"

# `stream`/`astream` do not hand `_stream`/`_astream` their run manager; ChatHogwild.stream/astream put
# the callbacks and the run id of the call here instead.
stream_sink: ContextVar[tuple[CallbackManager | AsyncCallbackManager, UUID] | None] = ContextVar(
    "hogwild_stream_sink", default=None
)

# When `invoke`/`ainvoke` stream implicitly (an outer `astream_events`), langchain-core calls
# `_stream`/`_astream` without their run manager; ChatHogwild's `_generate_with_cache` overrides put it here.
model_run: ContextVar[CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None] = ContextVar(
    "hogwild_model_run", default=None
)


def event_payload(event: RunEvent) -> dict[str, Any] | None:
    """The custom-event payload of a run event: a worker's text, or an in-engine tool call or result
    (worker None: every worker sees those). Step events have none."""
    if isinstance(event, TokenEvent):
        return {
            "worker": event.worker,
            "name": event.name,
            "text": event.text,
            "source": event.source,
            "step": event.step,
        }
    if isinstance(event, ToolCallEvent | ToolResultEvent):
        source = "tool_call" if isinstance(event, ToolCallEvent) else "tool_result"
        return {"worker": None, "name": "shared", "text": event.text, "source": source, "step": event.step}
    return None


def graph_writer() -> Callable[[Any], None] | None:
    """LangGraph's custom stream writer when the call runs inside a graph node (else None)."""
    try:
        from langgraph.config import get_stream_writer

        return get_stream_writer()
    except (ImportError, RuntimeError, KeyError, AttributeError):
        return None


def dispatch(manager: CallbackManagerForLLMRun | None, events: list[dict[str, Any]]) -> None:
    """Send `events` to the run's handlers (what `dispatch_custom_event` does inside a runnable)."""
    if manager is None:
        sink = stream_sink.get()
        if sink is not None and isinstance(sink[0], CallbackManager):
            for data in events:
                sink[0].on_custom_event(TOKEN_EVENT, data, run_id=sink[1])
        return
    if not manager.handlers:
        return
    for data in events:
        handle_event(
            manager.handlers,
            "on_custom_event",
            "ignore_custom_event",
            TOKEN_EVENT,
            data,
            run_id=manager.run_id,
            tags=manager.tags,
            metadata=manager.metadata,
        )


async def adispatch(manager: AsyncCallbackManagerForLLMRun | None, events: list[dict[str, Any]]) -> None:
    """Async `dispatch`."""
    if manager is None:
        sink = stream_sink.get()
        if sink is not None and isinstance(sink[0], AsyncCallbackManager):
            for data in events:
                await sink[0].on_custom_event(TOKEN_EVENT, data, run_id=sink[1])
        return
    if not manager.handlers:
        return
    for data in events:
        await ahandle_event(
            manager.handlers,
            "on_custom_event",
            "ignore_custom_event",
            TOKEN_EVENT,
            data,
            run_id=manager.run_id,
            tags=manager.tags,
            metadata=manager.metadata,
        )
