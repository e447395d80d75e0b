"""Standard LangChain unit tests for ChatHogwild (no model is loaded: construction is lazy)."""

from __future__ import annotations

import asyncio
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

    @property
    def standard_chat_model_params(self) -> dict:
        # The unit suite adds api_key="test" for hosted models. A local model has no key, and ChatHogwild
        # refuses settings it does not use; the other standard parameters (temperature, max_tokens,
        # timeout, stop, max_retries) are all accepted.
        params = super().standard_chat_model_params
        params.pop("api_key")
        return params


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
        ({"api_key": "k"}, "Unknown setting 'api_key'"),
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
