"""The tool-call parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild_agents.tool_calls import (
    find_complete_tool_call,
    open_tag_prefix_length,
    parse_tool_calls,
)


def test_valid_malformed_and_unclosed_calls() -> None:
    text = (
        'I will call. <tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call>'
        '<tool_call>{"name": "g", "arguments": "{\\"y\\": 2}"}</tool_call>'
        "<tool_call>not json</tool_call>"
        '<tool_call>{"name": "h", "argu'
    )
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.valid) for c in calls[:2]] == [
        ("f", {"x": 1}, True),
        ("g", {"y": 2}, True),
    ]
    assert not calls[2].valid and "not valid JSON" in calls[2].error
    assert not calls[3].valid
    assert parse_tool_calls("no calls") == []


def test_streaming_helpers() -> None:
    assert find_complete_tool_call('<tool_call>{"name": "f"') is None
    assert find_complete_tool_call('<tool_call>{"name": "f"}</tool_call>').name == "f"
    assert open_tag_prefix_length("text <tool_c") == 7
    assert open_tag_prefix_length("text") == 0


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>/{}[]":,tool_call namearguments01\\ \n')), max_size=120))
def test_parser_never_crashes_on_random_text(text: str) -> None:
    for call in parse_tool_calls(text):
        assert call.valid == (call.error is None)
        if call.valid:
            assert isinstance(call.name, str) and isinstance(call.arguments, dict)
    find_complete_tool_call(text)


@given(st.text(max_size=200))
def test_parser_never_crashes_on_any_unicode(text: str) -> None:
    parse_tool_calls(text)
    parse_tool_calls("<tool_call>" + text)


def test_deep_calls_are_malformed_not_crashes() -> None:
    deep = "[" * 3000 + "]" * 3000
    (call,) = parse_tool_calls('<tool_call>{"name": "f", "arguments": ' + deep + "}</tool_call>")
    assert call.error == "tool call is nested 3001 levels deep (at most 64)"
