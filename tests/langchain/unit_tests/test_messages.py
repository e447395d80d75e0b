"""Message conversion and tool helpers."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, ChatMessage, HumanMessage, SystemMessage, ToolMessage

from hogwild_agents.chat import content_text, with_system_text
from hogwild_agents.tool_calls import parse_tool_calls
from langchain_hogwild._messages import to_chat_messages
from langchain_hogwild._streaming import LiveText
from langchain_hogwild._tools import (
    normalize_tool_choice,
    to_call_chunks,
    to_langchain_calls,
    tool_instructions,
)

CALL = {"name": "add", "args": {"a": 1, "b": 2}, "id": "abc", "type": "tool_call"}


def test_roles_and_content_lists() -> None:
    chat = to_chat_messages(
        [
            SystemMessage("rules"),
            HumanMessage([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, "b"]),
            AIMessage("hi"),
            ChatMessage(role="developer", content="dev"),
        ]
    )
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "system"]
    assert chat[1]["content"] == "ab"
    assert content_text([{"type": "text", "text": "x"}, {"type": "tool_use"}]) == "x"


def test_tool_calls_and_results_in_default_format() -> None:
    chat = to_chat_messages(
        [
            AIMessage("", tool_calls=[CALL]),
            ToolMessage("3", name="add", tool_call_id="abc"),
            ToolMessage("bad", name="add", tool_call_id="abd", status="error"),
        ]
    )
    assert chat[0] == {
        "role": "assistant",
        "content": '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
    }
    assert chat[1] == {"role": "user", "content": "Result of add: 3"}
    assert chat[2]["content"] == "Result of add: Error: bad"
    assert "abc" not in str(chat)  # ids never reach the prompt: renders stay identical across turns
    assert parse_tool_calls(chat[0]["content"])[0].arguments == {"a": 1, "b": 2}


def test_tool_calls_for_templates_that_render_them() -> None:
    chat = to_chat_messages(
        [AIMessage("", tool_calls=[CALL]), ToolMessage("3", name="add", tool_call_id="abc")],
        native_tools=True,
    )
    assert chat[0]["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": CALL["args"]}}
    ]
    assert chat[1] == {"role": "tool", "content": "3", "tool_call_id": "abc", "name": "add"}


def test_system_text_is_merged_into_the_first_system_message() -> None:
    assert with_system_text([{"role": "user", "content": "q"}], "T")[0] == {"role": "system", "content": "T"}
    merged = with_system_text([{"role": "system", "content": "S"}, {"role": "user", "content": "q"}], "T")
    assert merged[0]["content"] == "S\n\nT" and len(merged) == 2


def test_tool_choice() -> None:
    names = ["a", "b"]
    assert normalize_tool_choice(None, names) is None
    assert normalize_tool_choice("auto", names) is None
    assert normalize_tool_choice("none", names) == "none"
    assert normalize_tool_choice("required", names) == "any"
    assert normalize_tool_choice(True, names) == "any"
    assert normalize_tool_choice("b", names) == "b"
    assert normalize_tool_choice({"type": "function", "function": {"name": "a"}}, names) == "a"
    with pytest.raises(ValueError, match="names no bound tool"):
        normalize_tool_choice("c", names)


def test_instructions_and_call_conversion() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "integer", "description": "first"}},
            },
        },
    }
    text = tool_instructions([tool])
    assert "add(a: integer) - Add." in text and "<tool_call>" in text
    calls, invalid = to_langchain_calls(
        parse_tool_calls(
            '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call><tool_call>{oops</tool_call>'
        )
    )
    assert calls[0]["args"] == {"a": 1} and invalid[0]["error"]
    assert len({calls[0]["id"], invalid[0]["id"]}) == 2
    chunks = to_call_chunks(calls, invalid)
    assert [c["index"] for c in chunks] == [0, 1]


def test_live_text_holds_back_stop_prefixes() -> None:
    live = LiveText(["STOP"])
    out = live.feed(" Hello ") + live.feed("wor") + live.feed("ld ST")
    assert out == "Hello world"
    assert live.feed("OP and more") == ""
    assert out + live.finish("Hello world") == "Hello world"


def test_past_calls_as_a_sentence_when_no_tools_are_offered() -> None:
    chat = to_chat_messages([AIMessage("", tool_calls=[CALL])], call_markup=False)
    assert chat[0]["content"] == 'I called add with {"a": 1, "b": 2}.'
