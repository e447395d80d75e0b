"""The tool-call parser and the guided-writing value scanner."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hogwild_agents.tool_calls import (
    find_complete_tool_call,
    open_tag_prefix_length,
    parse_tool_calls,
)
from langchain_hogwild._guided import closest_name, coerce, salvage, scan_value, skip_written


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
    scan_value(text)
    salvage(text, '"')
    salvage(text, "")


@given(st.text(max_size=200))
def test_parser_never_crashes_on_any_unicode(text: str) -> None:
    parse_tool_calls(text)
    parse_tool_calls("<tool_call>" + text)


def test_scan_value() -> None:
    assert scan_value('"abc", "x') == ("complete", "abc", 5)
    assert scan_value(" 3") == ("partial", None, 0)  # more digits may follow
    assert scan_value(" 3}}")[:2] == ("complete", 3)
    assert scan_value('{"a": [1') == ("partial", None, 0)
    assert scan_value("abc")[0] == "invalid"
    assert salvage('"unfinished', '"') == ("unfinished", '"')
    assert salvage('{"a": 1', "{") == ({"a": 1}, "}")


def test_coercion_and_names() -> None:
    assert coerce("3", {"type": "integer"}) == 3
    assert coerce(2.0, {"type": "integer"}) == 2
    assert coerce("redd", {"type": "string", "enum": ["red", "blue"]}) == "red"
    assert closest_name("magic_func", ["get_weather", "magic_function"]) == "magic_function"
    assert closest_name("", ["a", "b"]) == "a"
    assert skip_written(",", ', "b": ') == ' "b": '
    assert skip_written("}", ', "b": ') == ', "b": '


DEEP_OR_HUGE = st.builds(
    lambda depth, opener, middle: opener * depth + middle,
    st.integers(0, 5000),
    st.sampled_from(["[", "{", '{"a": ', '"', "-"]),
    st.sampled_from(["", "1", "9" * 4400, "1e999", '"x"', "]" * 20, "}"]),
)


@settings(max_examples=200, deadline=None)
@given(DEEP_OR_HUGE)
def test_value_scanning_never_raises_on_deep_or_huge_values(text: str) -> None:
    state, _, _ = scan_value(text)
    assert state in ("complete", "partial", "invalid")
    for prefix in ('"', "", "{"):
        salvage(text, prefix)
    for kind in ("integer", "number", "string", "boolean"):
        coerce(text, {"type": kind})
    for call in parse_tool_calls('<tool_call>{"name": "f", "arguments": ' + text):
        assert not call.valid


def test_deep_and_huge_values_in_calls_and_guided_output() -> None:
    deep = "[" * 3000 + "]" * 3000
    assert scan_value(deep)[0] == "invalid"
    assert salvage("[" * 3000, "") == (None, "")
    assert scan_value("9" * 5000 + ",")[0] == "partial"  # over Python's digit limit: not a value yet
    assert coerce("1e999", {"type": "integer"}) == "1e999"  # not an integer: left as written
    (call,) = parse_tool_calls('<tool_call>{"name": "f", "arguments": ' + deep + "}</tool_call>")
    assert call.error == "tool call is nested 3001 levels deep (at most 64)"
