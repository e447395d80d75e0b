"""ChatHogwild with in-engine tools: the run executes them, the caller never sees them as tool calls,
and calls and results reach LangChain as custom events."""

from __future__ import annotations

import json

from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from hogwild_agents.builtin_tools import calculator_tool
from langchain_hogwild import ChatHogwild
from langchain_hogwild._driver import CallController
from langchain_hogwild._events import event_payload


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return "sunny"


def test_engine_tool_calls_run_inside_and_become_events(smol_engine):
    llm = ChatHogwild(protocol=None, max_tokens=14, engine_tools=[calculator_tool()]).bind_tools(
        [get_weather]
    )
    spec = llm.bound._spec([HumanMessage("What is 6 * 7?")], None, llm.kwargs)
    assert spec.options["engine_tools"] and spec.options["tool_timeout_s"] == 30.0
    call = {"name": "calculator", "arguments": {"expression": "6 * 7"}}
    controller = CallController(spec)
    started = controller.start

    def start(run):  # worker 1 writes an in-engine call before anything else
        started(run)
        run.force(1, f"<tool_call>{json.dumps(call)}</tool_call>")

    controller.start = start
    handle = smol_engine.submit(spec.messages, controller=controller, **spec.options)
    events = [p for p in map(event_payload, handle.events()) if p is not None]
    outcome = controller.outcome(handle.result())
    shared = [e for e in events if e["worker"] is None]
    assert [e["source"] for e in shared] == ["tool_call", "tool_result"]
    assert "worker1 called calculator" in shared[0]["text"] and "42" in shared[1]["text"]
    assert outcome.tool_calls == []  # an in-engine tool call never ends the run as a LangChain tool call
    assert "called by worker1 → 42" in outcome.result.shared_text


def test_invoke_with_engine_tools_returns_an_answer():
    reply = ChatHogwild(protocol=None, max_tokens=8, engine_tools=[calculator_tool()]).invoke("Hi")
    assert isinstance(reply.content, str) and reply.response_metadata["n_workers"] == 2
