"""Standard LangChain unit tests for ChatHogwild (no model is loaded: construction is lazy)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest
from langchain_tests.unit_tests import ChatModelUnitTests

from hogwild_agents.errors import InvalidArgumentError
from langchain_hogwild import ChatHogwild, _registry


class TestChatHogwildUnit(ChatModelUnitTests):
    @property
    def chat_model_class(self) -> type[ChatHogwild]:
        return ChatHogwild

    @property
    def chat_model_params(self) -> dict:
        return {"n_workers": 2, "protocol": None}

    @property
    def supports_json_mode(self) -> bool:
        return True


def test_construction_is_lazy_and_fields_override() -> None:
    model = ChatHogwild(n_workers=3, temperature=0.5, stop=["x"], seed=1)
    assert model.engine is None  # nothing loaded yet
    params = model._get_ls_params(temperature=0.2, model="other")
    assert params["ls_provider"] == "hogwild"
    assert params["ls_model_name"] == "other"
    assert params["ls_temperature"] == 0.2
    assert params["ls_stop"] == ["x"]
    assert model._identifying_params["n_workers"] == 3
    assert "engine" not in model.model_dump()


def test_profile_reads_a_model_directory_without_loading_it(tmp_path) -> None:
    from transformers import LlamaConfig

    from langchain_hogwild import _registry

    LlamaConfig(max_position_embeddings=1234, rope_theta=10000.0).save_pretrained(tmp_path)
    model = ChatHogwild(model=str(tmp_path), max_context=None)
    assert model.profile["max_input_tokens"] == 1234 and model.profile["structured_output"]
    assert _registry.loaded(str(tmp_path), None, None) is None  # nothing was loaded
    assert ChatHogwild(model=str(tmp_path), max_context=100).profile["max_input_tokens"] == 100


def test_a_schema_that_cannot_constrain_output_fails_when_bound() -> None:
    import pytest

    from hogwild_agents.errors import GrammarError

    bad = {"type": "object", "properties": {"a": {"type": "strin"}}}
    with pytest.raises(GrammarError, match="Invalid type: strin"):
        ChatHogwild().with_structured_output({"title": "X", **bad}, method="json_schema")
    tools = [{"type": "function", "function": {"name": "f", "parameters": bad}}]
    with pytest.raises(GrammarError, match="tools' parameter schemas"):
        ChatHogwild().bind_tools(tools, tool_choice="f")
    ChatHogwild().bind_tools(tools)  # not enforced under tool_choice auto until a worker opens a call


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"model": "/no/such/model"}, "does not exist"),
        ({"model": "missing.gguf"}, "does not exist"),
        ({"n_workers": 0}, "n_workers must be between 1 and 64"),
        ({"n_workers": 2.0}, "n_workers must be an integer"),
        ({"n_workers": "3"}, "n_workers must be an integer"),
        ({"n_workers": 17}, "more than the 16 worker names"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"protocol": "colaborate"}, "Unknown protocol 'colaborate'"),
        ({"layout": "spiral"}, "layout"),
        ({"attention": "magic"}, "attention"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"stop": [""]}, "stop strings must not be empty"),
        ({"stop": ""}, "stop strings must not be empty"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"timeout": -1}, "timeout_s"),
        ({"tool_timeout_s": float("inf")}, "tool_timeout_s"),
        ({"device": "tpu"}, "Unknown device"),
        ({"dtype": "int8"}, "Unsupported dtype"),
        ({"max_retries": -1}, "max_retries"),
        (
            {"max_new_tokens": 5},
            "Unknown setting 'max_new_tokens' for ChatHogwild; did you mean 'max_tokens'?",
        ),
        ({"model_kwargs": {"x": 1}}, "Unknown setting 'model_kwargs'"),
        ({"top_pp": 0.9}, "Unknown setting 'top_pp' for ChatHogwild; did you mean 'top_p'?"),
        ({"timeot": 5}, "did you mean 'timeout'?"),  # aliases are suggested too
        ({"model_nme": "org/m"}, "did you mean 'model_name'?"),
        ({"base_url": "http://127.0.0.1:8000/v1"}, "base_url is not supported by ChatHogwild"),
        ({"model": "org/a", "model_name": "org/b"}, "model='org/a' and model_name='org/b' disagree"),
        ({"api_key": 123}, "api_key must be a string or None"),
    ],
)
def test_bad_settings_are_refused_at_construction_without_loading(monkeypatch, settings, message) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("langchain_hogwild._registry.HogwildEngine.from_pretrained", refuse)
    with pytest.raises(InvalidArgumentError, match=re.escape(message)) as caught:
        ChatHogwild(**settings)
    assert isinstance(caught.value, ValueError)


def test_standard_settings_are_accepted() -> None:
    model = ChatHogwild(timeout=5, max_retries=2, streaming=True, temperature=0, max_tokens=100, stop=[])
    assert (model.timeout_s, model.max_retries, model.streaming) == (5.0, 2, True)
    assert ChatHogwild(n_workers=40, protocol=None).n_workers == 40


SECRET = "sk-hogwild-secret-123"


def test_every_standard_langchain_argument_is_accepted(monkeypatch) -> None:
    """What provider-agnostic code passes to any chat model (init_chat_model, shared configs)."""
    from langchain_core.caches import InMemoryCache
    from langchain_core.callbacks import StdOutCallbackHandler
    from langchain_core.rate_limiters import InMemoryRateLimiter
    from pydantic import SecretStr

    monkeypatch.setattr("langchain_hogwild._registry.HogwildEngine.from_pretrained", _refuse_loading)
    cache, limiter, handler = (
        InMemoryCache(),
        InMemoryRateLimiter(requests_per_second=10),
        StdOutCallbackHandler(),
    )
    model = ChatHogwild(
        model="org/some-model",
        api_key=SECRET,
        base_url=None,
        timeout=7,
        max_retries=3,
        streaming=True,
        temperature=0.2,
        max_tokens=50,
        stop=["END"],
        rate_limiter=limiter,
        cache=cache,
        callbacks=[handler],
        tags=["t"],
        metadata={"k": "v"},
        verbose=False,
        disable_streaming="tool_calling",
        output_version="v1",
        name="hogwild-chat",
    )
    assert isinstance(model.api_key, SecretStr) and model.api_key.get_secret_value() == SECRET
    assert (model.model, model.model_name, model.timeout_s, model.max_retries) == ("org/some-model",) * 2 + (
        7.0,
        3,
    )
    assert (model.rate_limiter, model.cache, model.callbacks) == (limiter, cache, [handler])
    assert (model.tags, model.metadata["k"], model.name) == (["t"], "v", "hogwild-chat")
    assert (model.streaming, model.disable_streaming, model.output_version) == (True, "tool_calling", "v1")
    assert model.engine is None  # none of them loads anything
    assert ChatHogwild(api_key=SecretStr(SECRET)).api_key.get_secret_value() == SECRET
    assert ChatHogwild(api_key=None).api_key is None


def test_model_name_is_another_spelling_of_model() -> None:
    assert ChatHogwild(model_name="org/some-model") == ChatHogwild(model="org/some-model")
    assert ChatHogwild(model_name="org/some-model").model == "org/some-model"
    assert ChatHogwild(model_name="org/m").model_name == ChatHogwild(model="org/m").model_name == "org/m"
    assert ChatHogwild(model="org/m", model_name="org/m").model == "org/m"
    assert ChatHogwild(model=None, model_name="org/m").model == "org/m"
    assert ChatHogwild(model_name=None).model_name == "SmolLM2-135M-Instruct"
    assert ChatHogwild(model_name="org/m").model_dump()["model"] == "org/m"
    with pytest.raises(InvalidArgumentError, match="does not exist"):  # checked like model
        ChatHogwild(model_name="/no/such/model")


def test_base_url_is_refused_with_a_pointer_to_hogwild_serve() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        ChatHogwild(base_url="http://localhost:8000/v1", api_key=SECRET)
    message = str(caught.value)
    assert "in this process" in message and "hogwild serve" in message and "ChatOpenAI" in message
    assert SECRET not in message
    assert "base_url" not in ChatHogwild(base_url=None).model_dump()  # None says nothing: accepted


def test_timeout_bounds_a_call_and_max_retries_is_accepted_unused(monkeypatch) -> None:
    from langchain_core.messages import HumanMessage

    monkeypatch.setattr(ChatHogwild, "get_engine", lambda self: None)
    monkeypatch.setattr(ChatHogwild, "_chat_messages", lambda self, engine, messages, *_: ([], False))
    model = ChatHogwild(timeout=0.5, max_retries=4)
    spec = model._spec([HumanMessage("hi")], None, {})
    assert spec.options["timeout_s"] == 0.5  # the run's wall-clock limit (finish_reason "timeout")
    assert model._spec([HumanMessage("hi")], None, {"timeout_s": 2}).options["timeout_s"] == 2
    assert "max_retries" not in spec.options


def _refuse_loading(*args, **kwargs):
    raise AssertionError("a model was loaded")


def _leaks(model: ChatHogwild) -> list[str]:
    from langchain_core.load import dumps

    views = {
        "repr": repr(model),
        "str": str(model),
        "model_dump": str(model.model_dump()),
        "model_dump_json": model.model_dump_json(),
        "dumps": dumps(model),
        "dumps_pretty": dumps(model, pretty=True),
        "identifying_params": str(model._identifying_params),
        "ls_params": str(model._get_ls_params()),
        "invocation_params": str(model._get_invocation_params()),
        "asdict": str(model.asdict()),
        "llm_string": model._get_llm_string(),
    }
    return [where for where, text in views.items() if SECRET in text]


def test_api_key_is_never_shown_or_serialised(monkeypatch, caplog) -> None:
    monkeypatch.setattr("langchain_hogwild._registry.HogwildEngine.from_pretrained", _refuse_loading)
    from langchain_core.callbacks import BaseCallbackHandler

    class Trace(BaseCallbackHandler):
        """Records everything a tracer is given (serialized model, invocation params, errors)."""

        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_chat_model_start(self, serialized, messages, **kwargs) -> None:
            self.seen.append(repr((serialized, messages, kwargs)))

        def on_llm_error(self, error, **kwargs) -> None:
            self.seen.append(repr((error, kwargs)))

    traced = Trace()
    with caplog.at_level(logging.DEBUG):
        model = ChatHogwild(api_key=SECRET, model="org/some-model")
        assert _leaks(model) == []
        assert _leaks(model.model_copy()) == []
        with pytest.raises(AssertionError, match="a model was loaded") as failed_call:
            model.invoke("hi", config={"callbacks": [traced]})  # a call that fails (no model can load)
        with pytest.raises(InvalidArgumentError) as unknown_option:
            model.invoke("hi", top_pp=1)
    assert model.api_key.get_secret_value() == SECRET  # kept, just never shown
    assert len(traced.seen) == 2 and "org/some-model" in traced.seen[0]  # the trace did see the model
    assert not any(SECRET in seen for seen in traced.seen)
    assert any("Loading an engine" in r.getMessage() for r in caplog.records)  # DEBUG logs were captured
    assert SECRET not in caplog.text
    assert SECRET not in "".join(str(record.__dict__) for record in caplog.records)
    for caught in (failed_call, unknown_option):
        assert SECRET not in str(caught.value) and SECRET not in repr(caught.value)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"top_pp": 1}, "did you mean 'top_p'?"),
        ({"n_workers": "two"}, "n_workers must be an integer"),
        ({"layout": "spiral"}, "layout"),
        ({"base_url": "http://x"}, "base_url"),
        ({"model": "org/a", "model_name": "org/b"}, "disagree"),
    ],
)
def test_a_bad_construction_never_quotes_the_api_key(settings, message) -> None:
    for key in (SECRET, __import__("pydantic").SecretStr(SECRET)):
        with pytest.raises(InvalidArgumentError, match=re.escape(message)) as caught:
            ChatHogwild(api_key=key, **settings)
        error = caught.value
        chain = [error, error.__cause__, error.__context__]
        assert not any(SECRET in str(e) or SECRET in repr(e) for e in chain if e is not None)
    with pytest.raises(InvalidArgumentError) as caught:
        ChatHogwild(api_key=[SECRET])  # a key of the wrong type is not quoted either
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("call", ["invoke", "stream", "batch", "ainvoke"])
def test_unknown_call_options_are_refused(monkeypatch, call) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("langchain_hogwild._registry.HogwildEngine.from_pretrained", refuse)
    model = ChatHogwild(protocol=None, model="org/some-model")
    with pytest.raises(InvalidArgumentError, match=r"Unknown call option\(s\) 'foo', 'max_new_tokens'"):
        if call == "invoke":
            model.invoke("hi", foo=1, max_new_tokens=3)
        elif call == "stream":
            list(model.stream("hi", foo=1, max_new_tokens=3))
        elif call == "batch":
            model.batch(["hi"], foo=1, max_new_tokens=3)
        else:
            asyncio.run(model.ainvoke("hi", foo=1, max_new_tokens=3))


def test_compile_is_passed_to_the_engine_and_keys_its_sharing(monkeypatch) -> None:
    """Engines are shared per (model, device, dtype, compile): a compiled one never serves a call that
    asked for none, and the other way round."""
    loaded = []

    def from_pretrained(model=None, **options):
        from types import SimpleNamespace

        from transformers import LlamaConfig

        loaded.append(options["compile"])
        return SimpleNamespace(model=SimpleNamespace(config=LlamaConfig()))

    monkeypatch.setattr(_registry.HogwildEngine, "from_pretrained", from_pretrained)
    monkeypatch.setattr(_registry, "_engines", {})
    compiled = ChatHogwild(model="org/some-model", compile=True)
    plain = ChatHogwild(model="org/some-model")
    assert compiled.get_engine() is compiled.get_engine()
    assert plain.get_engine() is not compiled.get_engine()
    assert loaded == [True, False]
    assert ChatHogwild(model="org/some-model", compile=True).model_dump()["compile"] is True
