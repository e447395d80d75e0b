"""OpenAI-format function schemas of the tools the engine runs: from a typed Python callable (with
pydantic, a core dependency), or from a LangChain tool (with langchain-core, the `langchain` extra,
imported only when such a tool is given)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pydantic

from hogwild_agents.errors import InvalidArgumentError

LANGCHAIN_EXTRA = 'pip install "hogwild-agents[langchain]"'
_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Yields|Raises|Examples?|Notes?):\s*$")
_ARGUMENT = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


def is_langchain_tool(tool: Any) -> bool:
    """True for an instance of a LangChain class (a `BaseTool`, e.g. made by `@tool`), told by its
    classes' modules so that nothing is imported."""
    return not isinstance(tool, type) and any(
        cls.__module__.split(".")[0] in ("langchain", "langchain_core") for cls in type(tool).__mro__
    )


def langchain_function(tool: Any) -> dict[str, Any]:
    """The function schema {name, description, parameters} of a LangChain tool."""
    try:
        from langchain_core.utils.function_calling import convert_to_openai_tool
    except ImportError as error:
        raise ImportError(f"LangChain tools need langchain-core: {LANGCHAIN_EXTRA} ({error})") from error
    return convert_to_openai_tool(tool)["function"]


def callable_function(func: Callable[..., Any]) -> dict[str, Any]:
    """The function schema {name, description, parameters} of a typed callable: its name, its
    docstring's text before any "Args:" section, and its parameters' JSON schema (from the type hints;
    descriptions from a Google-style "Args:" section or `Annotated[..., Field(description=...)]`)."""
    name = getattr(func, "__name__", None) or type(func).__name__
    try:
        parameters = pydantic.TypeAdapter(func).json_schema()
    except Exception as error:  # a type hint pydantic cannot describe
        raise InvalidArgumentError(
            f"Cannot describe tool {name!r} from its signature ({type(error).__name__}: {error}); give "
            "JSON-schema-able type hints, or wrap it as an EngineTool with explicit parameters."
        ) from None
    description, notes = _docstring(inspect.getdoc(func) or "")
    parameters.pop("title", None)
    parameters.pop("additionalProperties", None)
    properties = parameters.setdefault("properties", {})
    parameters.setdefault("type", "object")
    for argument, schema in properties.items():
        schema.pop("title", None)
        if argument in notes and "description" not in schema:
            schema["description"] = notes[argument]
    return {"name": name, "description": description, "parameters": parameters}


def _docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) of a Google-style docstring."""
    description: list[str] = []
    notes: dict[str, str] = {}
    section, current, notes_indent = None, None, 0
    for line in doc.splitlines():
        header = _SECTION.match(line)
        if header:
            section, current = header.group(1), None
            continue
        if section is None:
            description.append(line)
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            argument = _ARGUMENT.match(line)
            if argument and (current is None or _indent(line) <= notes_indent):
                current, notes_indent = argument.group(1).lstrip("*"), _indent(line)
                notes[current] = argument.group(2).strip()
            elif current is not None:
                notes[current] = f"{notes[current]} {line.strip()}".strip()
    return "\n".join(description).strip(), notes


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())
