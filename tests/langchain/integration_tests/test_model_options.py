"""ChatHogwild's token accounting, profile, sampling knobs, metadata and lifetime, on tiny models."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from hogwild_agents.errors import ContextLengthError, HogwildError
from langchain_hogwild import ChatHogwild, _registry

MESSAGES = [
    SystemMessage("You are terse."),
    HumanMessage("What is the weather in Paris?"),
    AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "call_1"}]),
    ToolMessage("sunny", tool_call_id="call_1", name="get_weather"),
    HumanMessage("And in Rome?"),
]


@tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return "sunny"


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


class Answer(BaseModel):
    text: str


@pytest.fixture
def engine(tiny_engines):
    return tiny_engines["llama"]


@pytest.mark.parametrize(
    ("fields", "bind"),
    [
        ({"protocol": "collaborate"}, {}),
        ({"protocol": None}, {}),
        ({"protocol": "vote", "n_workers": 3}, {"tools": [get_weather, multiply]}),
        ({"protocol": None}, {"tools": [get_weather]}),
        ({"protocol": "collaborate"}, {"response_format": Answer}),
        ({"protocol": "check_redundancy", "engine_tools": [multiply]}, {}),
    ],
    ids=["collaborate", "raw", "vote-tools", "raw-tools", "response-format", "engine-tools"],
)
def test_counted_tokens_are_the_tokens_a_call_feeds(engine, fields, bind) -> None:
    model = ChatHogwild(engine=engine, max_tokens=1, **fields)
    tools = bind.get("tools")
    kwargs = {}
    runnable = model.bind_tools(tools) if tools else model
    if "response_format" in bind:
        schema = Answer.model_json_schema()
        kwargs["response_format"] = {"type": "json_schema", "schema": schema}
        runnable = runnable.bind(**kwargs)
    counted = model.get_num_tokens_from_messages(MESSAGES, tools, **kwargs)
    fed = runnable.invoke(MESSAGES).usage_metadata["input_tokens"]
    assert counted == fed
    assert counted > len(engine.encode("".join(str(m.content) for m in MESSAGES)))  # protocol, template


def test_token_ids_come_from_the_models_tokenizer(engine, monkeypatch) -> None:
    import langchain_core.language_models.base as base

    def no_fallback(text):
        raise AssertionError("the GPT-2 fallback must not be used")

    monkeypatch.setattr(base, "_get_token_ids_default_method", no_fallback)
    model = ChatHogwild(engine=engine)
    assert model.get_token_ids("Hello world") == engine.encode("Hello world")
    assert model.get_num_tokens("Hello world") == len(engine.encode("Hello world"))
    assert model.get_num_tokens_from_messages([("user", "hi")]) > 0  # tuples are messages too


def test_profile_from_the_models_config(engine) -> None:
    profile = ChatHogwild(engine=engine).profile
    assert profile["max_input_tokens"] == engine.model.config.max_position_embeddings
    assert profile["tool_calling"] and profile["tool_choice"] and profile["structured_output"]
    assert profile["reasoning_output"] and profile["text_inputs"] and not profile["image_inputs"]
    assert ChatHogwild(engine=engine, max_context=1000).profile["max_input_tokens"] == 1000
    assert ChatHogwild(engine=engine, profile={"max_input_tokens": 7}).profile == {"max_input_tokens": 7}


def test_top_k_one_is_greedy(engine) -> None:
    model = ChatHogwild(engine=engine, protocol=None, max_tokens=8)
    sampled = model.invoke("Hi", temperature=1.0, top_k=1, seed=5)
    greedy = model.invoke("Hi", temperature=0.0)
    assert sampled.content == greedy.content
    assert model.invoke("Hi", temperature=1.0, seed=5).content != greedy.content


def test_repetition_penalty_stops_repeats(engine) -> None:
    """The random model repeats tokens greedily; a strong penalty on seen tokens prevents it."""
    model = ChatHogwild(engine=engine, protocol=None, n_workers=1, max_tokens=24)

    def generated(message: AIMessage) -> list[int]:
        text = message.response_metadata["workers"][0]["text"]
        return engine.encode(text)

    free = generated(model.invoke("Say something."))
    assert len(set(free)) < len(free)
    penalised = generated(model.invoke("Say something.", repetition_penalty=1e6))
    prompt = set(engine.prompt_token_ids("Say something.", protocol=None))
    assert len(set(penalised)) == len(penalised) and not prompt & set(penalised)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        model.invoke("Hi", repetition_penalty=0)


def test_reasoning_off_returns_only_the_answer(engine) -> None:
    message = ChatHogwild(engine=engine, protocol=None, max_tokens=4, reasoning=False).invoke("Hi")
    assert "reasoning_content" not in message.additional_kwargs
    assert all("text" not in w for w in message.response_metadata["workers"])
    assert message.content and message.usage_metadata["output_tokens"] == 8


def test_max_context_bounds_the_views(engine) -> None:
    model = ChatHogwild(engine=engine, protocol=None, max_tokens=50, n_workers=2)
    prompt_tokens = model.get_num_tokens_from_messages([HumanMessage("Hi")])
    with pytest.raises(ContextLengthError, match="max_context is 5"):
        model.invoke("Hi", max_context=5)
    message = model.invoke("Hi", max_context=prompt_tokens + 6)
    assert message.response_metadata["finish_reason"] == "length"
    assert message.usage_metadata["output_tokens"] < 2 * 50


def test_reasoning_tokens_timings_and_provider(engine) -> None:
    raw = ChatHogwild(engine=engine, protocol=None, max_tokens=6)
    two = raw.invoke("Hi")
    assert two.usage_metadata["output_token_details"]["reasoning"] == 6  # worker 1's; worker 0 answers
    assert raw.invoke("Hi", n_workers=1).usage_metadata["output_token_details"]["reasoning"] == 0
    call = raw.bind_tools([multiply], tool_choice="multiply").invoke("Hi", max_tokens=40)
    details = call.usage_metadata
    call_tokens = details["output_tokens"] - details["output_token_details"]["reasoning"]
    caller, other = call.response_metadata["workers"]  # worker 0 writes the forced call
    assert 0 < call_tokens == caller["generated_tokens"] <= 40  # every token of the caller's is the call's
    assert details["output_token_details"]["reasoning"] == other["generated_tokens"] > 0
    metadata = two.response_metadata
    assert metadata["model_provider"] == "hogwild"
    timings = metadata["timings"]
    assert timings["total_s"] == pytest.approx(timings["prefill_s"] + timings["decode_s"])
    assert timings["prefill_s"] > 0 and timings["decode_s"] > 0
    chunks = list(raw.stream("Hi"))
    assert (
        chunks[-1].response_metadata["model_provider"] == "hogwild"
        and "timings" in chunks[-1].response_metadata
    )


def test_close_unloads_the_shared_engine_when_unused(engine) -> None:
    """The shared engine is registered under a hub-style id, a model reference the settings accept."""
    _registry.register_engine(engine, "hogwild-tests/tiny-close", None, None)
    first, second = (
        ChatHogwild(model="hogwild-tests/tiny-close"),
        ChatHogwild(model="hogwild-tests/tiny-close"),
    )
    assert first.get_engine() is engine and second.get_engine() is engine
    first.close()
    assert _registry.loaded("hogwild-tests/tiny-close", None, None) is engine  # the second still uses it
    with pytest.raises(HogwildError, match="closed"):
        first.invoke("Hi")
    with second:
        second.invoke("Hi", protocol=None, max_tokens=1)
    assert _registry.loaded("hogwild-tests/tiny-close", None, None) is None  # nobody uses it: dropped
    first.close()  # closing twice is harmless
