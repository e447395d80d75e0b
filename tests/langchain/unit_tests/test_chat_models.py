"""Standard LangChain unit tests for ChatHogwild (no model is loaded: construction is lazy)."""

from __future__ import annotations

from langchain_tests.unit_tests import ChatModelUnitTests

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


def test_compile_is_passed_to_the_engine_and_keys_its_sharing(monkeypatch) -> None:
    """Engines are shared per (model, device, dtype, compile): a compiled one never serves a call that
    asked for none, and the other way round."""
    loaded = []

    def from_pretrained(model=None, **options):
        loaded.append(options["compile"])
        return object()

    monkeypatch.setattr(_registry.HogwildEngine, "from_pretrained", from_pretrained)
    monkeypatch.setattr(_registry, "_engines", {})
    compiled = ChatHogwild(model="some-model", compile=True)
    plain = ChatHogwild(model="some-model")
    assert compiled.get_engine() is compiled.get_engine()
    assert plain.get_engine() is not compiled.get_engine()
    assert loaded == [True, False]
    assert ChatHogwild(model="some-model", compile=True).model_dump()["compile"] is True
