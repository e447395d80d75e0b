"""LangChain integration of hogwild_agents: `ChatHogwild` (needs the `langchain` extra)."""

try:
    import langchain_core  # noqa: F401
except ImportError as error:
    raise ImportError(
        f'langchain_hogwild needs langchain-core: pip install "hogwild-agents[langchain]" ({error})'
    ) from error

from langchain_hogwild._events import TOKEN_EVENT
from langchain_hogwild.chat_models import ChatHogwild

__all__ = ["TOKEN_EVENT", "ChatHogwild"]
