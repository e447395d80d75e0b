"""Per-worker token events, sent as LangChain custom events of the chat model's own run."""

from __future__ import annotations

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

from hogwild_agents.results import StepRecord
from hogwild_agents.run import HogwildRun

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


def worker_events(run: HogwildRun, record: StepRecord) -> list[dict[str, Any]]:
    """One event payload per worker that wrote text in this step, then one per in-engine tool call or
    tool result of this step (worker None: every worker sees those)."""
    events = [
        {
            "worker": worker,
            "name": run.workers[worker].name,
            "text": text,
            "source": record.sources.get(worker, "sampled"),
            "step": record.index,
        }
        for worker, text in sorted(record.texts.items())
        if text
    ]
    shared = []
    for entry in reversed(run.trace):
        if entry.step != record.index:
            break
        if entry.kind in ("tool_call", "tool_result"):
            shared.append(
                {
                    "worker": None,
                    "name": "shared",
                    "text": entry.text,
                    "source": entry.kind,
                    "step": entry.step,
                }
            )
    return events + shared[::-1]


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
