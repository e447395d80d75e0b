"""Tool schemas from typed callables match what LangChain derives from the same functions."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

from hogwild_agents.errors import InvalidArgumentError
from hogwild_agents.hooks import EngineTool
from hogwild_agents.tool_schemas import callable_function, is_langchain_tool


def echo(text: str, seconds: float = 0.5, tags: list[str] | None = None) -> str:
    """Wait, then echo the text.

    Args:
        text: what to echo,
            over two lines
        seconds (float): how long to wait

    Returns:
        the text
    """
    return text


async def pick(x: Annotated[int, Field(description="an x")], mode: Literal["a", "b"] = "a") -> str:
    return mode * x


def untyped(a, b=2):
    """No argument section."""
    return a


@pytest.mark.parametrize("func", [echo, pick, untyped])
def test_callable_schemas_match_langchains(func):
    assert callable_function(func) == convert_to_openai_tool(func)["function"]


def test_langchain_tools_are_told_apart_without_importing_langchain():
    wrapped = tool(echo)
    assert is_langchain_tool(wrapped) and not is_langchain_tool(echo) and not is_langchain_tool(type(wrapped))
    assert EngineTool.from_any(wrapped).schema["function"] == convert_to_openai_tool(wrapped)["function"]


def test_a_signature_that_has_no_json_schema_is_refused_clearly():
    class Handle:
        pass

    def bad(handle: Handle) -> None:
        """Bad."""

    with pytest.raises(InvalidArgumentError, match="Cannot describe tool 'bad'"):
        callable_function(bad)
