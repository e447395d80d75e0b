"""Tool schemas in the prompt, tool_choice, and parsed calls as LangChain tool calls."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import InvalidToolCall, ToolCall, ToolCallChunk
from langchain_core.messages.tool import invalid_tool_call, tool_call, tool_call_chunk

from hogwild_agents.tool_calls import CLOSE, OPEN, ParsedToolCall

FORCED = ("any", "required")


def describe_tool(tool: dict[str, Any]) -> str:
    """One tool as a signature line: `name(arg: type, ...) - description`, with argument notes."""
    function = tool["function"]
    properties = (function.get("parameters") or {}).get("properties") or {}
    arguments, notes = [], []
    for name, schema in properties.items():
        kind = schema.get("type") or ("enum" if "enum" in schema else "any")
        arguments.append(f"{name}: {kind}")
        if schema.get("description"):
            notes.append(f"    {name}: {schema['description']}")
    head = f"- {function['name']}({', '.join(arguments)})"
    description = " ".join(str(function.get("description") or "").split())
    return "\n".join([f"{head} - {description}" if description else head, *notes])


def tool_instructions(tools: Sequence[dict[str, Any]]) -> str:
    """System text listing the tools and the default call format, for chat templates without tools."""
    listing = "\n".join(describe_tool(tool) for tool in tools)
    return (
        f"You can call these functions:\n{listing}\n\n"
        "To call a function, reply with one line and nothing else:\n"
        f'{OPEN}{{"name": "<function name>", "arguments": {{"<argument>": <value>}}}}{CLOSE}\n'
        "The function's result comes back in the next message. "
        "When no function is needed, answer directly."
    )


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str | None:
    """None (the model decides), "none", "any" (some tool must be called), or one tool's name."""
    if tool_choice is None or tool_choice == "auto":
        return None
    if tool_choice is False or tool_choice == "none":
        return "none"
    if tool_choice is True or tool_choice in FORCED:
        return "any"
    if isinstance(tool_choice, dict):  # {"type": "function", "function": {"name": ...}}
        tool_choice = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
    if isinstance(tool_choice, str) and tool_choice in names:
        return tool_choice
    raise ValueError(
        f"tool_choice {tool_choice!r} names no bound tool; use 'auto', 'none', 'any', 'required' "
        f"or one of {list(names)}."
    )


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def to_langchain_calls(calls: Sequence[ParsedToolCall]) -> tuple[list[ToolCall], list[InvalidToolCall]]:
    """Valid calls as `tool_calls`, malformed ones as `invalid_tool_calls`, each with a unique id."""
    valid: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []
    for call in calls:
        if call.valid:
            valid.append(tool_call(name=call.name, args=call.arguments, id=new_call_id()))
        else:
            invalid.append(
                invalid_tool_call(name=call.name, args=call.raw, id=new_call_id(), error=call.error)
            )
    return valid, invalid


def to_call_chunks(calls: Sequence[ToolCall], invalid: Sequence[InvalidToolCall]) -> list[ToolCallChunk]:
    """Calls as stream chunks (one complete chunk per call, indexed in order)."""
    chunks = [
        tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=i)
        for i, c in enumerate(calls)
    ]
    offset = len(chunks)
    chunks += [
        tool_call_chunk(name=c["name"], args=c["args"], id=c["id"], index=offset + i)
        for i, c in enumerate(invalid)
    ]
    return chunks
