"""Finding and parsing tool calls in a worker's text.

The format is the one Qwen/Hermes-style chat templates define, and the library's default for models
whose template has none: `<tool_call>{"name": "...", "arguments": {...}}</tool_call>`.
Nothing here evaluates model output: the body is parsed as JSON and checked, nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
MAX_NESTING = 64  # deeper JSON in a call is refused as malformed (no recursion limit is ever reached)


@dataclass(frozen=True)
class ParsedToolCall:
    """A tool call found in a worker's text: valid (`error` None) or malformed (`error` says why).

    `start` and `end` locate it in the text it was found in: its `<tool_call>` tag begins at `start`,
    and `end` is just past its `</tool_call>` (the text's end for a call that was never closed)."""

    name: str | None
    arguments: dict[str, Any]
    raw: str  # the text between the tags
    error: str | None = None
    start: int = 0
    end: int = 0

    @property
    def valid(self) -> bool:
        return self.error is None


def parse_call_body(raw: str) -> tuple[str | None, dict[str, Any], str | None]:
    """(name, arguments, error) from the JSON between the tags. Never raises."""
    body, error = load_json(raw)
    if error is not None:
        return None, {}, f"tool call {error}"
    if not isinstance(body, dict):
        return None, {}, "tool call must be a JSON object with 'name' and 'arguments'"
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        return None, {}, "tool call has no 'name' string"
    arguments = body.get("arguments", body.get("parameters", {}))
    if isinstance(arguments, str):  # some models encode arguments as a JSON string
        arguments, error = load_json(arguments) if arguments.strip() else ({}, None)
        if error is not None:
            return name, {}, f"arguments of {name!r} are a string that is not JSON"
    if not isinstance(arguments, dict):
        return name, {}, f"arguments of {name!r} must be a JSON object"
    return name.strip(), arguments, None


def load_json(text: str) -> tuple[Any, str | None]:
    """(value, None) for JSON text, or (None, what is wrong). Never raises: text nested deeper than
    MAX_NESTING levels, huge integers and invalid JSON are all reported as errors."""
    depth = nesting_depth(text)
    if depth > MAX_NESTING:
        return None, f"is nested {depth} levels deep (at most {MAX_NESTING})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as err:
        return None, f"is not valid JSON ({err.msg} at char {err.pos})"
    except (ValueError, RecursionError) as err:  # e.g. an integer over Python's digit limit
        return None, f"is not usable JSON ({err})"


def nesting_depth(text: str) -> int:
    """The deepest bracket nesting of JSON-like `text` (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(depth - 1, 0)
    return deepest


def find_tool_call(text: str, start: int = 0) -> ParsedToolCall | None:
    """The first complete tool call that begins at or after `start`, or None."""
    opening = text.find(OPEN, start)
    if opening < 0:
        return None
    body_start = opening + len(OPEN)
    closing = text.find(CLOSE, body_start)
    if closing < 0:
        return None
    raw = text[body_start:closing].strip()
    name, arguments, error = parse_call_body(raw)
    return ParsedToolCall(name, arguments, raw, error, opening, closing + len(CLOSE))


def find_tool_calls(text: str, start: int = 0) -> list[ParsedToolCall]:
    """Every complete tool call in `text` that begins at or after `start`, in order."""
    found, position = [], start
    while (call := find_tool_call(text, position)) is not None:
        found.append(call)
        position = call.end
    return found


def open_call_body(text: str, start: int = 0) -> str | None:
    """The text written so far inside a `<tool_call>` opened at or after `start` and not closed after
    it (`start`: past the text's last complete call), or None when no call is open there."""
    opening = text.find(OPEN, start)
    if opening < 0 or text.find(CLOSE, opening) >= 0:
        return None
    return text[opening + len(OPEN) :]


def unclosed_tool_call(body: str, start: int = 0) -> ParsedToolCall:
    """A call whose closing tag is missing (`body`: the text after its `<tool_call>` tag, which begins
    at `start`), reported as malformed."""
    raw = body.strip()
    name, arguments, error = parse_call_body(raw)
    end = start + len(OPEN) + len(body)
    return ParsedToolCall(name, arguments, raw, error or "tool call was not closed", start, end)


def parse_tool_calls(text: str) -> list[ParsedToolCall]:
    """Every tool call in `text`, in order. A call whose closing tag is missing (the text ended inside
    it) is reported as malformed; text outside the tags is ignored. Never raises on any input."""
    calls = find_tool_calls(text)
    tail_start = calls[-1].end if calls else 0
    opening = text.find(OPEN, tail_start)
    if opening >= 0:
        calls.append(unclosed_tool_call(text[opening + len(OPEN) :], opening))
    return calls
