"""Standard LangChain integration tests on the embedded model (raw workers, short budgets)."""

from __future__ import annotations

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_tests.integration_tests import ChatModelIntegrationTests

from langchain_hogwild import ChatHogwild

# pytest-asyncio runs in strict mode here: mark the async tests (ours and the standard suite's).
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.filterwarnings("ignore:The test <Function:pytest.PytestWarning"),
]


class TestChatHogwildIntegration(ChatModelIntegrationTests):
    @property
    def chat_model_class(self) -> type[ChatHogwild]:
        return ChatHogwild

    @property
    def chat_model_params(self) -> dict:
        # protocol=None: the 135M model does not follow the collaboration protocol's answer format, and
        # these tests check plumbing (tests/langchain/integration_tests/test_hogwild.py runs a protocol).
        return {"n_workers": 2, "protocol": None, "max_tokens": 24}

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supported_usage_metadata_details(self) -> dict:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False):
        model = ChatHogwild(**self.chat_model_params)
        messages = ["You are a poet. Reply with one word.", "Say hello."]
        model.invoke(messages[0])
        if stream:
            full = None
            for chunk in model.stream(messages[0]):
                full = chunk if full is None else full + chunk
            return full
        return model.invoke(messages[0])

    @pytest.mark.xfail(
        reason="The test binds its tool with tool_choice auto, and the 135M model then answers directly "
        "instead of calling it. Forced choices are covered by test_tool_calling and test_hogwild.py."
    )
    def test_agent_loop(self, model: BaseChatModel) -> None:
        super().test_agent_loop(model)
