"""ChatHogwild-specific behaviour: tool_choice, worker events, prefix reuse, concurrency, agents."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_hogwild import TOKEN_EVENT, ChatHogwild

RAW = {"n_workers": 2, "protocol": None, "max_tokens": 16}


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 degrees in {city}."


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_named_tool_choice_is_enforced() -> None:
    model = ChatHogwild(**RAW).bind_tools([get_weather, add], tool_choice="add")
    message = model.invoke("Hello! How are you?")  # nothing here asks for a tool
    assert [call["name"] for call in message.tool_calls] == ["add"]
    assert set(message.tool_calls[0]["args"]) == {"a", "b"}
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.content == ""


def test_any_tool_choice_with_several_tools() -> None:
    message = ChatHogwild(**RAW).bind_tools([get_weather, add], tool_choice="any").invoke("Weather in Paris?")
    assert len(message.tool_calls) == 1 and message.tool_calls[0]["name"] in {"get_weather", "add"}
    assert message.tool_calls[0]["id"].startswith("call_")


def test_json_schema_output_is_validated() -> None:
    class City(BaseModel):
        name: str = Field(description="the city's name")
        country: str = Field(description="its country")

    result = (
        ChatHogwild(**RAW).with_structured_output(City, method="json_schema").invoke("Name a city in France.")
    )
    assert isinstance(result, City)


def test_worker_token_events_and_metadata() -> None:
    class Collect(BaseCallbackHandler):
        def __init__(self) -> None:
            self.tokens: list[dict] = []

        def on_custom_event(self, name, data, **kwargs) -> None:
            if name == TOKEN_EVENT:
                self.tokens.append(data)

    handler = Collect()
    end = ChatHogwild(**RAW).invoke("Hello", config={"callbacks": [handler]})
    tokens = handler.tokens
    assert {t["worker"] for t in tokens} == {0, 1}
    assert {"worker", "name", "text", "source", "step"} <= set(tokens[0])
    streamed = Collect()
    list(ChatHogwild(**RAW).stream("Hello", config={"callbacks": [streamed]}))
    assert streamed.tokens == tokens  # greedy: the same run, the same events
    assert len(end.response_metadata["workers"]) == 2
    assert end.usage_metadata["output_tokens"] == sum(
        w["generated_tokens"] for w in end.response_metadata["workers"]
    )
    texts = {w: "".join(t["text"] for t in tokens if t["worker"] == w) for w in (0, 1)}
    assert texts[0].strip() == end.response_metadata["workers"][0]["text"].strip()


@pytest.mark.asyncio
async def test_async_worker_token_events() -> None:
    model = ChatHogwild(**RAW)
    names = [
        e["name"] async for e in model.astream_events("Hi", version="v2") if e["event"] == "on_custom_event"
    ]
    assert names and set(names) == {TOKEN_EVENT}


@pytest.mark.asyncio
@pytest.mark.parametrize("inner", ["invoke", "ainvoke"])
async def test_worker_events_reach_an_outer_astream_events(inner) -> None:
    """A chain that calls the model inside (sync or async) still shows the workers' tokens to an
    outer `astream_events`, attributed to the model's own run."""
    model = ChatHogwild(**RAW)

    async def call_async(text: str):
        return await model.ainvoke(text)

    chain = RunnableLambda(model.invoke if inner == "invoke" else call_async)
    events = [e async for e in chain.astream_events("Hi", version="v2")]
    model_runs = {e["run_id"] for e in events if e["event"] == "on_chat_model_start"}
    tokens = [e for e in events if e["event"] == "on_custom_event" and e["name"] == TOKEN_EVENT]
    assert tokens and {e["data"]["worker"] for e in tokens} == {0, 1}
    assert {e["run_id"] for e in tokens} == model_runs
    message = events[-1]["data"]["output"]  # each token arrives once
    for worker in (0, 1):
        streamed = "".join(e["data"]["text"] for e in tokens if e["data"]["worker"] == worker)
        assert streamed.strip() == message.response_metadata["workers"][worker]["text"].strip()


def test_stream_chunks() -> None:
    chunks = list(ChatHogwild(**{**RAW, "n_workers": 1}).stream("Hello"))
    assert len(chunks) > 1  # raw single-worker answers stream token by token
    assert chunks[-1].chunk_position == "last"
    assert [bool(c.usage_metadata) for c in chunks].count(True) == 1
    assert ["model_name" in c.response_metadata for c in chunks].count(True) == 1
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == ChatHogwild(**{**RAW, "n_workers": 1}).invoke("Hello").content


def test_follow_up_reuses_the_prompt_prefix(smol_engine) -> None:
    model = ChatHogwild(**RAW)
    first = [HumanMessage("Name a color.")]
    reply = model.invoke(first)
    second = model.invoke([*first, reply, HumanMessage("Name another one.")])
    prompt_tokens = reply.usage_metadata["input_tokens"]
    assert reply.response_metadata["reused_prompt_tokens"] < prompt_tokens - 1  # a new conversation
    assert second.response_metadata["reused_prompt_tokens"] >= prompt_tokens - 1
    assert second.usage_metadata["input_token_details"]["cache_read"] >= prompt_tokens - 1


CONCURRENT_PROMPTS = ("Name a fruit.", "Say a word about the number 7.", "Name a color.", "What is 2 + 2?")


def concurrent_calls() -> list[tuple[str, dict]]:
    """16 calls: four prompts, each with several seeds, some seeds on several prompts, 1 or 2 workers."""
    return [
        (CONCURRENT_PROMPTS[i % 4], {"seed": i // 3, "n_workers": 1 + i % 2, "max_tokens": 3 + i % 2})
        for i in range(16)
    ]


def answer(message: AIMessage) -> tuple[str, list[str]]:
    return message.content, [w["text"] for w in message.response_metadata["workers"]]


def test_concurrent_calls_match_sequential_runs() -> None:
    """8 threads and 8 asyncio tasks call one instance at the same time; each call gets exactly what the
    same call gives alone."""
    model = ChatHogwild(**{**RAW, "temperature": 0.8})
    calls = concurrent_calls()
    sequential = [answer(model.invoke(prompt, **options)) for prompt, options in calls]

    async def in_tasks(batch: list[tuple[str, dict]]) -> list[tuple[str, list[str]]]:
        replies = await asyncio.gather(*(model.ainvoke(prompt, **options) for prompt, options in batch))
        return [answer(r) for r in replies]

    with ThreadPoolExecutor(8) as pool:
        threaded = [pool.submit(lambda c: answer(model.invoke(c[0], **c[1])), call) for call in calls[:8]]
        awaited = asyncio.run(in_tasks(calls[8:]))  # while the threads run
        concurrent = [future.result() for future in threaded] + awaited
    assert concurrent == sequential
    assert len({reply for reply, _ in sequential}) > 4  # the calls really differ


def test_tool_round_trip_with_an_agent() -> None:
    pytest.importorskip("langchain.agents")
    from langchain.agents import create_agent
    from langchain.agents.middleware import wrap_model_call

    @wrap_model_call
    def first_turn_calls_a_tool(request, handler):
        """The 135M model needs the call forced, and the answer turn without tools."""
        has_result = any(isinstance(m, ToolMessage) for m in request.messages)
        return handler(request.override(tool_choice="none" if has_result else "get_weather"))

    seen: list[list] = []

    @wrap_model_call
    def record(request, handler):
        seen.append(list(request.messages))
        return handler(request)

    agent = create_agent(
        ChatHogwild(**{**RAW, "max_tokens": 24}), [get_weather], middleware=[record, first_turn_calls_a_tool]
    )
    state = agent.invoke({"messages": [HumanMessage("What is the weather in Paris?")]})
    messages = state["messages"]
    assert isinstance(messages[1], AIMessage) and messages[1].tool_calls[0]["name"] == "get_weather"
    assert isinstance(messages[2], ToolMessage) and "sunny" in messages[2].content
    assert isinstance(messages[-1], AIMessage) and messages[-1].content and not messages[-1].tool_calls
    assert len(messages) == 4
    assert any(
        isinstance(m, ToolMessage) and "sunny" in m.content for m in seen[-1]
    )  # result reached the model


def test_collaborate_protocol_runs() -> None:
    message = ChatHogwild(n_workers=2, protocol="collaborate", max_tokens=8).invoke("What is 2 + 2?")
    assert [w["name"] for w in message.response_metadata["workers"]] == ["Alice", "Bob"]
    assert message.response_metadata["protocol"] == "collaborate"
    assert "[Alice]" in message.additional_kwargs["reasoning_content"]


def test_a_call_timeout_returns_what_was_written() -> None:
    model = ChatHogwild(**{**RAW, "max_tokens": 200})
    message = model.invoke("Count from one to one hundred.", timeout_s=1e-6)  # per-call override
    assert message.response_metadata["finish_reason"] == "timeout"
    assert message.usage_metadata["output_tokens"] < 200


def test_logits_processors_steer_the_workers(shared_smol_engine) -> None:
    blue = shared_smol_engine.encode(" blue")
    assert len(blue) == 1

    def only_blue(input_ids, scores):
        allowed = torch.full_like(scores, float("-inf"))
        allowed[:, blue[0]] = 0.0
        return allowed

    message = ChatHogwild(**RAW, logits_processors={1: [only_blue]}).invoke("Name a colour.")
    steered, free = message.response_metadata["workers"][1], message.response_metadata["workers"][0]
    assert steered["text"].endswith(" blue" * steered["generated_tokens"])
    assert steered["generated_tokens"] == RAW["max_tokens"]
    assert free["text"] != steered["text"]


def _forcing_calls(spec, calls_by_worker: dict[int, list[dict]]):
    """A call controller whose workers are made to write these tool calls before anything else."""
    from langchain_hogwild._driver import CallController

    controller = CallController(spec)
    started = controller.start

    def start(run) -> None:
        started(run)
        for worker, calls in calls_by_worker.items():
            run.force(worker, "".join(f"<tool_call>{json.dumps(c)}</tool_call>" for c in calls))

    controller.start = start
    return controller


def test_parallel_tool_calls_from_several_workers_and_one_worker(smol_engine) -> None:
    llm = ChatHogwild(engine=smol_engine, **RAW).bind_tools([get_weather, add])
    spec = llm.bound._spec([HumanMessage("Weather in Paris and Rome, and 2 + 3?")], None, llm.kwargs)
    calls = {
        0: [
            {"name": "get_weather", "arguments": {"city": "Paris"}},
            {"name": "get_weather", "arguments": {"city": "Rome"}},
        ],
        1: [{"name": "add", "arguments": {"a": 2, "b": 3}}],
    }
    controller = _forcing_calls(spec, calls)
    handle = smol_engine.submit(spec.messages, controller=controller, **spec.options)
    outcome = controller.outcome(handle.result())
    assert [(c.name, c.arguments) for c in outcome.tool_calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome"}),
        ("add", {"a": 2, "b": 3}),
    ]
    message = llm.bound._result(outcome, spec).generations[0].message
    assert len({call["id"] for call in message.tool_calls}) == 3
    assert outcome.result.steps < RAW["max_tokens"]  # the calls ended the run, not the budget
    assert message.response_metadata["finish_reason"] == "tool_calls"

    single = ChatHogwild(engine=smol_engine, **RAW).bind_tools([get_weather, add], parallel_tool_calls=False)
    spec = single.bound._spec([HumanMessage("Weather?")], None, single.kwargs)
    controller = _forcing_calls(spec, calls)
    handle = smol_engine.submit(spec.messages, controller=controller, **spec.options)
    assert len(controller.outcome(handle.result()).tool_calls) == 1
