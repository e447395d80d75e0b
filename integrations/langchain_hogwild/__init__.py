"""LangChain integration of hogwild_agents: `ChatHogwild`."""

from langchain_hogwild._events import TOKEN_EVENT
from langchain_hogwild.chat_models import ChatHogwild

__all__ = ["TOKEN_EVENT", "ChatHogwild"]
