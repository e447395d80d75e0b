"""`hogwild serve`: the OpenAI-compatible server, talked to over HTTP with the real `openai` client and
langchain-openai's ChatOpenAI (the embedded SmolLM2-135M; a tiny random-weight model for long runs)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from hogwild_agents.server import APIError, ServerConfig, create_app
from hogwild_agents.server.background import BackgroundServer
from hogwild_agents.server.convert import prepare
from hogwild_agents.server.schemas import parse_request

KEY = "test-key"
MODEL = "SmolLM2-135M-Instruct"
SMALL = {"max_tokens": 12, "temperature": 0}
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def smol_url(smol_engine):
    config = ServerConfig(
        model_name=MODEL, max_tokens=12, temperature=0.0, api_key=KEY, max_request_bytes=64_000
    )
    with BackgroundServer(create_app(smol_engine, config)) as server:
        yield server.url


@pytest.fixture(scope="module")
def client(smol_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{smol_url}/v1", api_key=KEY, max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def tiny(tiny_engines):
    """A server over a tiny random-weight model, which never ends a run by itself: raw workers, long runs."""
    engine = tiny_engines["llama"]
    config = ServerConfig(
        model_name="tiny", protocol=None, max_tokens=8, max_tokens_limit=4000, temperature=0.0
    )
    with BackgroundServer(create_app(engine, config)) as server:
        yield engine, server.url


# ---- the openai client ---------------------------------------------------------------------------
def test_models_and_health(client, smol_url) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    health = httpx.get(f"{smol_url}/health")  # no key needed
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_plain_completion(client) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=QUESTION, **SMALL, extra_body={"n_workers": 2}
    )
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    extra = choice.message.model_extra
    workers = extra["hogwild_workers"]
    assert [w["name"] for w in workers] == ["Alice", "Bob"]
    assert extra["reasoning_content"] == extra["reasoning"]
    assert all(w["text"].strip() in extra["reasoning_content"] for w in workers)
    usage = reply.usage
    assert usage.completion_tokens == sum(w["generated_tokens"] for w in workers)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 < usage.completion_tokens_details.reasoning_tokens <= usage.completion_tokens


def test_streaming_sends_reasoning_deltas_then_the_answer(client) -> None:
    options = {
        "model": MODEL,
        "messages": QUESTION,
        **SMALL,
        "extra_body": {"n_workers": 2, "layout": "combined"},
    }
    chunks = list(
        client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
    )
    whole = client.chat.completions.create(**options)  # greedy: the same run
    assert chunks[0].choices[0].delta.role == "assistant"
    kinds, streamed = [], {0: "", 1: ""}
    for chunk in chunks[1:-1]:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning_content"):
            assert extra["reasoning"] == extra["reasoning_content"]
            worker = extra["hogwild_worker"]
            assert worker["name"] == ("Alice", "Bob")[worker["index"]]
            streamed[worker["index"]] += extra["reasoning_content"]
            kinds.append("reasoning")
        elif delta.content:
            kinds.append("content")
    assert kinds[0] == "reasoning" and "content" in kinds
    assert kinds == sorted(kinds, key=lambda k: k == "content")  # every reasoning delta before the answer
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert answer == whole.choices[0].message.content
    workers = whole.choices[0].message.model_extra["hogwild_workers"]
    for i, worker in enumerate(workers):  # every token arrived, the opening step header included
        assert worker["text"].startswith(f"**{worker['name']} [1]:**") and streamed[i] == worker["text"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_forced_tool_call(client) -> None:
    choice = {"type": "function", "function": {"name": "get_weather"}}
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    options = {"model": MODEL, "tools": [WEATHER], "tool_choice": choice, **SMALL, "max_tokens": 24}
    options["extra_body"] = {"protocol": "none"}
    reply = client.chat.completions.create(messages=ask, **options)
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert set(json.loads(call.function.arguments)) == {"city"}
    assert reply.choices[0].message.content is None

    chunks = list(client.chat.completions.create(messages=ask, **options, stream=True))
    calls = [c for chunk in chunks if chunk.choices for c in chunk.choices[0].delta.tool_calls or ()]
    assert [(c.index, c.type, c.function.name) for c in calls] == [(0, "function", "get_weather")]
    assert calls[0].id.startswith("call_") and json.loads(calls[0].function.arguments) == json.loads(
        call.function.arguments
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_response_format(client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["name", "population"],
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Name a city in France."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        max_tokens=24,
        extra_body={"protocol": "none"},
    )
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"name", "population"} and isinstance(value["population"], int)


# ---- langchain-openai ----------------------------------------------------------------------------
def test_chat_openai(smol_url) -> None:
    """Raw workers (protocol "none"): their answer streams as content while it is written."""
    options = {"model": MODEL, "base_url": f"{smol_url}/v1", "api_key": KEY, "max_retries": 0}
    llm = ChatOpenAI(**options, **SMALL, extra_body={"protocol": "none"})
    message = llm.invoke("What is 2 + 3?")
    assert isinstance(message, AIMessage) and message.content
    streamed = list(llm.stream("What is 2 + 3?", stream_usage=True))
    assert sum(bool(chunk.content) for chunk in streamed) > 1  # live, not in one piece
    whole = sum(streamed, AIMessageChunk(""))
    assert whole.content == message.content
    assert whole.usage_metadata["output_tokens"] == message.usage_metadata["output_tokens"]

    call = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    assert [c["name"] for c in call.tool_calls] == ["get_weather"] and "city" in call.tool_calls[0]["args"]
    result = ToolMessage("Sunny, 21 degrees.", tool_call_id=call.tool_calls[0]["id"])
    followup = llm.invoke([HumanMessage("Weather in Paris?"), call, result])  # no tools now: an answer
    assert followup.content and not followup.tool_calls

    class City(BaseModel):
        name: str = Field(description="the city's name")
        country: str = Field(description="its country")

    structured = ChatOpenAI(**options, max_tokens=24, extra_body={"protocol": "none"})
    assert isinstance(structured.with_structured_output(City, method="json_schema").invoke("A city?"), City)


# ---- refusals ------------------------------------------------------------------------------------
def test_requests_without_the_key_get_401(client, smol_url) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        client.with_options(api_key="wrong").chat.completions.create(model=MODEL, messages=QUESTION)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    missing = httpx.post(f"{smol_url}/v1/chat/completions", json={"model": MODEL, "messages": QUESTION})
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{smol_url}/v1/models").status_code == 401


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"n": 2}, "n", "only n=1"),
        ({"extra_body": {"layout": "grid"}}, "layout", "'contiguous', 'interleaved' or 'combined'"),
        ({"extra_body": {"protocol": "chaos"}}, "protocol", "unknown protocol 'chaos'"),
        ({"extra_body": {"n_workers": 0}}, "n_workers", "greater than or equal to 1"),
        ({"max_tokens": 5000}, "max_tokens", "limit of 4096"),
        ({"max_completion_tokens": 5000}, "max_completion_tokens", "limit of 4096"),
        ({"extra_body": {"beam_width": 4}}, "beam_width", "Unrecognized request argument"),
        ({"tool_choice": "required"}, "tool_choice", "only allowed when tools are specified"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"logprobs": True}, "logprobs", "not supported"),
        ({"messages": [{"role": "user", "content": "x" * 70_000}]}, None, "larger than this server's limit"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
            "send text parts only",
        ),
    ],
)
def test_bad_requests_get_400(client, fields, param, says) -> None:
    request = {"model": MODEL, "messages": QUESTION, **fields}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**request)
    error = refused.value.body
    assert refused.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert error["param"] == param and says in error["message"]


def test_unknown_model_and_bad_json(client, smol_url) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    broken = httpx.post(
        f"{smol_url}/v1/chat/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}"}
    )
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"


# ---- runs: concurrency and disconnects -------------------------------------------------------------
def test_concurrent_streams_each_get_their_whole_text(tiny) -> None:
    _, url = tiny
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    prompts = [f"Story number {i}:" for i in range(4)]

    async def stream(prompt: str) -> str:
        chunks = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], stream=True, max_tokens=8
        )
        return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

    async def main() -> tuple[list[str], list[str]]:
        together = await asyncio.gather(*(stream(p) for p in prompts))
        alone = [await stream(p) for p in prompts]
        return together, alone

    together, alone = asyncio.run(main())
    assert all(together) and together == alone


def _wait_until_free(engine, seconds: float = 20.0) -> float:
    start = time.monotonic()
    while engine.busy:
        assert time.monotonic() - start < seconds, "the dropped request's run is still going"
        time.sleep(0.05)
    return time.monotonic() - start


def test_a_dropped_stream_cancels_its_run(tiny) -> None:
    engine, url = tiny
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(
        model="tiny", messages=QUESTION, stream=True, max_tokens=4000, extra_body={"n_workers": 2}
    )
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 5:
            break
    assert engine.busy
    stream.close()  # the client goes away mid-run
    _wait_until_free(engine)
    forwards = engine.scheduler.forwards
    time.sleep(0.3)
    assert engine.scheduler.forwards == forwards  # nothing runs any more


def test_a_dropped_request_cancels_its_run(tiny) -> None:
    engine, url = tiny
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    _wait_until_free(engine)


# ---- validation without a server ---------------------------------------------------------------------
def test_request_defaults_and_overrides() -> None:
    config = ServerConfig(
        n_workers=3, protocol="collaborate", layout="interleaved", max_tokens=64, timeout_s=9
    )
    base = {"model": config.model_name, "messages": QUESTION}
    call = prepare(parse_request(json.dumps(base).encode()), config)
    assert {k: call.options[k] for k in ("n_workers", "protocol", "layout", "max_tokens")} == {
        "n_workers": 3,
        "protocol": "collaborate",
        "layout": "interleaved",
        "max_tokens": 64,
    }
    assert call.reasoning and not call.stream and call.options["timeout_s"] == 9
    raw = {
        **base,
        "protocol": None,
        "n_workers": 1,
        "stop": "\n",
        "max_tokens": 9,
        "max_completion_tokens": 7,
    }
    call = prepare(parse_request(json.dumps(raw).encode()), config)
    assert call.options["protocol"] is None and not call.reasoning
    assert call.options["stop"] == ["\n"] and call.options["max_tokens"] == 7


def test_message_conversion_names_tool_results() -> None:
    config = ServerConfig()
    request = {
        "model": config.model_name,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Rome?"}],
            },
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "Rain."},
        ],
    }
    system, user, assistant, tool = prepare(parse_request(json.dumps(request).encode()), config).messages
    assert (system.type, system.content) == ("system", "Be brief.")
    assert user.content == "Weather in Rome?"
    assert assistant.tool_calls == [
        {"name": "get_weather", "args": {"city": "Rome"}, "id": "c1", "type": "tool_call"}
    ]
    assert (tool.name, tool.tool_call_id, tool.content) == ("get_weather", "c1", "Rain.")
    request["messages"][2]["tool_calls"][0]["function"]["arguments"] = "{city"
    with pytest.raises(APIError) as bad:
        prepare(parse_request(json.dumps(request).encode()), config)
    assert bad.value.param == "messages[2].tool_calls[0].function.arguments"


def test_server_config_refuses_bad_defaults() -> None:
    with pytest.raises(ValueError, match="max_tokens_limit"):
        ServerConfig(max_tokens=500, max_tokens_limit=100)
    with pytest.raises(ValueError, match="layout"):
        ServerConfig(layout="grid")
    with pytest.raises(ValueError, match="api_key"):
        ServerConfig(api_key="")


# ---- the command line and the package --------------------------------------------------------------
def test_hogwild_serve_builds_the_app_from_its_options(monkeypatch, capsys, tiny_engines) -> None:
    import uvicorn

    from hogwild_agents import cli
    from hogwild_agents.engine import HogwildEngine

    loaded, served = {}, {}
    monkeypatch.setattr(
        HogwildEngine,
        "from_pretrained",
        lambda model, **kw: loaded.update(model=model, **kw) or tiny_engines["llama"],
    )
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    argv = ["serve", "some/model", "--port", "9123", "--api-key", "k", "--workers", "3", "--protocol", "none"]
    assert cli.main([*argv, "--layout", "contiguous", "--max-tokens", "64", "--device", "cpu"]) == 0
    assert loaded == {"model": "some/model", "device": "cpu", "dtype": None}
    assert (served["host"], served["port"]) == ("127.0.0.1", 9123)
    config = served["app"].state.config
    assert (config.model_name, config.api_key, config.n_workers, config.protocol) == (
        "some/model",
        "k",
        3,
        None,
    )
    assert (config.layout, config.max_tokens) == ("contiguous", 64)
    assert cli.main(["serve", "--max-tokens", "5000"]) == 2  # one line on stderr, before loading
    assert "max_tokens must be between 1 and max_tokens_limit" in capsys.readouterr().err

    from hogwild_agents.server import ray_app

    deployed = {}
    monkeypatch.setattr(ray_app, "run", lambda args, *where: deployed.update(args=args, where=where))
    assert (
        cli.main(["serve", "m", "--ray", "--replicas", "2", "--protocol", "none", "--host", "0.0.0.0"]) == 0
    )
    args = deployed["args"]
    assert (args.model, args.replicas, deployed["where"]) == ("m", 2, ("0.0.0.0", 8000, None))
    assert args.server_config() == ServerConfig(model_name="m", protocol=None)


def test_importing_the_library_needs_no_server_packages() -> None:
    import subprocess
    import sys

    code = (
        "import sys, hogwild_agents, hogwild_agents.cli, hogwild_agents.server; "
        "print([m for m in ('fastapi', 'uvicorn', 'ray', 'starlette') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_benchmark_smoke(tmp_path) -> None:
    from benchmarks import serve_load

    results = serve_load.main(["--quick", "--protocol", "none", "--json", str(tmp_path / "out.json")])
    assert results["all_complete"] and results["same_text"] == 4
    for kind in ("concurrent", "sequential"):
        row = results[kind]
        assert row["completion_tokens"] == 4 * 2 * 4  # requests x workers x tokens: random weights never stop
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"]
    assert json.loads((tmp_path / "out.json").read_text())["setup"]["requests"] == 4
