"""Schema-safe output through ChatHogwild: a random-weight model sampled at temperature 1 writes junk
when free; with_structured_output and enforced tool calls still always parse and validate."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
import torch
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_hogwild import ChatHogwild

SEEDS = range(30)
METHODS = ("json_schema", "function_calling", "json_mode")


class Person(BaseModel):
    name: str = Field(max_length=20)
    role: Literal["lead", "support", "cameo"]


class Movie(BaseModel):
    """A movie."""

    title: str
    genres: list[str] = Field(max_length=3)
    cast: list[Person] = Field(min_length=1, max_length=2)
    rating: float = Field(ge=0, le=10)
    year: int = Field(ge=1888, le=2100)
    sequel_of: str | None = None


@tool
def get_weather(city: str, days: int = 1) -> str:
    """Weather forecast for a city."""
    return f"sunny in {city} for {days} days"


@tool
def tag(labels: list[str]) -> str:
    """Tag the conversation with labels."""
    return ",".join(labels)


@pytest.fixture
def tiny(tiny_engines):
    return ChatHogwild(engine=tiny_engines["llama"], protocol=None, temperature=1.0, max_tokens=64)


@pytest.mark.parametrize("seed", SEEDS)
def test_structured_output_always_validates(tiny, seed) -> None:
    method = METHODS[seed % 3]
    out = tiny.with_structured_output(Movie, method=method, include_raw=True).invoke("A movie.", seed=seed)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Movie)
    raw = out["raw"]
    written = raw.tool_calls[0]["args"] if method == "function_calling" else json.loads(raw.content)
    jsonschema.validate(written, Movie.model_json_schema())


@pytest.mark.parametrize("seed", range(15))
def test_enforced_tool_arguments_validate(tiny, seed) -> None:
    choice = ("any", "tag", "required")[seed % 3]
    message = tiny.bind_tools([get_weather, tag], tool_choice=choice).invoke("Hello.", seed=seed)
    (call,) = message.tool_calls
    assert call["name"] == "tag" if choice == "tag" else call["name"] in {"get_weather", "tag"}
    tool_schema = {"get_weather": get_weather, "tag": tag}[call["name"]].tool_call_schema.model_json_schema()
    jsonschema.validate(call["args"], tool_schema)
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_a_call_a_worker_opens_by_itself_is_guided(tiny, tiny_engines) -> None:
    """Under tool_choice auto, a worker that writes `<tool_call>` gets the tools' grammar from then on."""
    opening = tiny_engines["llama"].encode("<tool_call>")

    class WriteTheOpening:
        """Worker 1 writes the opening tag, then is free."""

        def __init__(self) -> None:
            self.written = 0

        def __call__(self, input_ids, scores):
            if self.written >= len(opening):
                return scores
            forced = torch.full_like(scores, float("-inf"))
            forced[:, opening[self.written]] = 0.0
            self.written += 1
            return forced

    model = tiny.model_copy(update={"logits_processors": {1: [WriteTheOpening()]}})
    message = model.bind_tools([get_weather, tag]).invoke("Hello.", seed=4)
    (call,) = message.tool_calls
    assert message.response_metadata["tool_call_worker"] == 1
    tool_schema = {"get_weather": get_weather, "tag": tag}[call["name"]].tool_call_schema.model_json_schema()
    jsonschema.validate(call["args"], tool_schema)


@pytest.mark.parametrize("seed", range(10))
def test_tools_with_a_response_format_give_a_call_or_the_answer(tiny, seed) -> None:
    schema = Movie.model_json_schema()
    response_format = {"type": "json_schema", "json_schema": {"name": "Movie", "schema": schema}}
    message = (
        tiny.bind_tools([get_weather, tag]).bind(response_format=response_format).invoke("Hi.", seed=seed)
    )
    if message.tool_calls:
        assert message.tool_calls[0]["name"] in {"get_weather", "tag"} and not message.content
    else:
        jsonschema.validate(json.loads(message.content), schema)


def test_an_agent_with_a_response_format_uses_the_native_structured_output(tiny) -> None:
    """The profile says structured_output, so create_agent binds the response format itself."""
    from langchain.agents import create_agent

    agent = create_agent(tiny, tools=[], response_format=Movie)
    state = agent.invoke({"messages": [("user", "A movie, please.")]})
    assert isinstance(state["structured_response"], Movie)
