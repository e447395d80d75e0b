"""The tool-call parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild_agents.tool_calls import OPEN, find_tool_call, open_call_body, parse_tool_calls
from langchain_hogwild._streaming import LiveText


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
    assert not calls[3].valid and calls[3].raw == '{"name": "h", "argu'
    assert (calls[3].start, calls[3].end) == (text.rindex(OPEN), len(text))
    assert parse_tool_calls("no calls") == []


def test_streaming_a_call() -> None:
    """While a call is written: no complete call until its closing tag, the open call's text, and
    streamed answer text holding back what may begin a `<tool_call>` tag."""
    assert find_tool_call('<tool_call>{"name": "f"') is None
    assert open_call_body('<tool_call>{"name": "f"') == '{"name": "f"'
    assert parse_tool_calls(OPEN + '{"name": "f"}')[0].error == "tool call was not closed"
    assert find_tool_call('<tool_call>{"name": "f"}</tool_call>').name == "f"
    assert open_call_body('<tool_call>{"name": "f"}</tool_call>') is None
    live = LiveText([OPEN])
    assert live.feed("text <tool_") == "text" and live.feed("ca") == ""
    assert live.feed("ll>") == "" and live.stopped  # the call is never streamed as text
    other = LiveText([OPEN])
    assert other.feed("a <tool") == "a" and other.feed(" b") == " <tool b"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('<>/{}[]":,tool_call namearguments01\\ \n')), max_size=120))
def test_parser_never_crashes_on_random_text(text: str) -> None:
    end = 0
    for call in parse_tool_calls(text):
        assert call.start >= end and text[call.start :].startswith(OPEN) and call.end <= len(text)
        if call.valid:
            assert isinstance(call.name, str) and isinstance(call.arguments, dict)
        else:
            assert call.error and call.arguments == {}
        end = call.end


@given(st.text(max_size=200))
def test_parser_never_crashes_on_any_unicode(text: str) -> None:
    parse_tool_calls(text)
    parse_tool_calls("<tool_call>" + text)


def test_deep_calls_are_malformed_not_crashes() -> None:
    deep = "[" * 3000 + "]" * 3000
    (call,) = parse_tool_calls('<tool_call>{"name": "f", "arguments": ' + deep + "}</tool_call>")
    assert call.error == "tool call is nested 3001 levels deep (at most 64)"
