"""Standard LangChain unit tests for ChatHogwild (no model is loaded: construction is lazy)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_hogwild import ChatHogwild


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
