"""LangChain messages -> the role/content dicts the engine renders with a chat template.

Role names and content flattening come from `hogwild_agents.chat`; this module only knows LangChain's
message classes (tool calls and tool results, in the default text format or for templates that render
them).

Rendering is deterministic (no ids, no timestamps), so a follow-up turn's prompt extends the previous
turn's prompt and the engine reuses that prefix's K/V.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ChatMessage, ToolMessage

from hogwild_agents.chat import content_text, role_name
from hogwild_agents.tool_calls import CLOSE, OPEN


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One tool call in the default text format."""
    return f"{OPEN}{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}{CLOSE}"


def to_chat_messages(
    messages: Sequence[BaseMessage], *, native_tools: bool = False, call_markup: bool = True
) -> list[dict[str, Any]]:
    """Convert LangChain messages to chat-template dicts.

    `native_tools`: the chat template renders `tool_calls` and tool results itself (Qwen/Hermes style);
    otherwise an AI message's tool calls are written into its text in the default format, and tool
    results become user turns naming the tool (chat templates without tool support, like SmolLM2's,
    were not trained on a `tool` role). `call_markup=False` (no tools offered in this call) writes past
    calls as a plain sentence, so that a small model answers instead of repeating the call.
    """
    converted: list[dict[str, Any]] = []
    for message in messages:
        text = content_text(message.content)
        role = role_name(message.role if isinstance(message, ChatMessage) else message.type)
        entry: dict[str, Any] = {"role": role, "content": text}
        if isinstance(message, AIMessage) and message.tool_calls:
            if native_tools:
                entry["tool_calls"] = [
                    {"type": "function", "function": {"name": call["name"], "arguments": call["args"]}}
                    for call in message.tool_calls
                ]
            elif not call_markup:
                calls = " ".join(
                    f"I called {c['name']} with {json.dumps(c['args'], ensure_ascii=False)}."
                    for c in message.tool_calls
                )
                entry["content"] = f"{text}\n{calls}" if text else calls
            else:
                calls = "".join(render_tool_call(c["name"], c["args"]) for c in message.tool_calls)
                entry["content"] = f"{text}\n{calls}" if text else calls
        elif isinstance(message, ToolMessage):
            if message.status == "error" and not text.lower().startswith("error"):
                text = f"Error: {text}"
            if native_tools:
                entry.update(content=text, tool_call_id=message.tool_call_id)
                if message.name:
                    entry["name"] = message.name
            else:  # templates without tool turns: the result comes back as a user turn
                label = f" of {message.name}" if message.name else ""
                entry.update(role="user", content=f"Result{label}: {text}")
        converted.append(entry)
    return converted
