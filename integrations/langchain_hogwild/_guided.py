"""Schema-guided writing: force a JSON skeleton into one worker's stream, let the model write the values.

A *program* is a generator that yields `Force(text)` (tokens the worker must take next) and
`Read(prefix)` (the model writes one JSON value; the program receives it), and returns what it built.
`GuidedWriter` runs a program against a live run, one step at a time. Integer, number and boolean
values are constrained while they are written (a logits processor allows only tokens that keep the
text such a value); strings and free objects are read as written. A value ends where a complete JSON
value does, and anything the model writes after it in the same token is ignored; the returned object
is assembled from the values, so it always matches the skeleton (keys, nesting, tool name) of the
schema.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any

from hogwild_agents.results import StepRecord
from hogwild_agents.run import HogwildRun
from hogwild_agents.tool_calls import CLOSE, MAX_NESTING, OPEN, ParsedToolCall, load_json, nesting_depth
from langchain_hogwild._value_masks import KINDS, TypedValueProcessor

_DECODER = json.JSONDecoder()
_VALUE_STARTS = '"{[-0123456789tfn'


@dataclass(frozen=True)
class Force:
    text: str


@dataclass(frozen=True)
class Read:
    prefix: str = ""  # the part of the value already forced ('"' for strings, '{' for free objects)
    max_tokens: int = 40
    kind: str | None = None  # "integer", "number" or "boolean": only tokens that keep that type are allowed
    end: str = ""  # the skeleton's character after the value ("," or "}"), which may close a typed value


Program = Generator[Force | Read, Any, Any]


def scan_value(text: str) -> tuple[str, Any, int]:
    """("complete", value, end), ("partial", None, 0) or ("invalid", None, 0) for a JSON value at the
    start of `text`. A number or literal is complete only once a character follows it."""
    stripped = text.lstrip()
    if not stripped:
        return "partial", None, 0
    if stripped[0] not in _VALUE_STARTS or nesting_depth(stripped) > MAX_NESTING:
        return "invalid", None, 0
    try:
        value, end = _DECODER.raw_decode(stripped)
    except (ValueError, RecursionError):  # not yet complete JSON (or an integer over the digit limit)
        return "partial", None, 0
    if not isinstance(value, str | dict | list) and end >= len(stripped):
        return "partial", None, 0
    return "complete", value, len(text) - len(stripped) + end


def salvage(text: str, prefix: str) -> tuple[Any, str]:
    """Best-effort value of an unfinished `text`, and the text that closes it in the stream."""
    if prefix == '"':
        body = text[1:]
        value, error = load_json(f'"{body}"')
        return (value, '"') if error is None else (body.replace('\\"', '"'), '"')
    for closer in ("", "}", '"}', "]", "}}"):
        value, error = load_json(text.strip() + closer)
        if error is None:
            return value, closer
    return None, ""


def skip_written(trailing: str, forced: str) -> str:
    """`forced` without the separator the model already wrote after its value (`",` then `, "b"`)."""
    written = trailing.strip()
    if written and forced.lstrip().startswith(written):
        return forced.lstrip()[len(written) :]
    return forced


# ---- programs -----------------------------------------------------------------------------------
def resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` and unwrap `Optional[X]` / single-member `allOf`."""
    for _ in range(8):
        if "$ref" in schema and schema["$ref"].startswith("#/"):
            target: Any = root
            for part in schema["$ref"][2:].split("/"):
                target = target.get(part, {})
            schema = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
            continue
        options = schema.get("anyOf") or schema.get("oneOf")
        if options:
            non_null = [o for o in options if o.get("type") != "null"]
            if len(non_null) == 1:
                schema = {**non_null[0], **{k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}}
                continue
        if len(schema.get("allOf") or ()) == 1:
            schema = {**schema["allOf"][0], **{k: v for k, v in schema.items() if k != "allOf"}}
            continue
        break
    return schema


def coerce(value: Any, schema: dict[str, Any]) -> Any:
    """Nudge a written value toward the schema's type (a number written as text, a near-miss enum)."""
    kind = schema.get("type")
    try:
        if kind == "integer" and isinstance(value, str | float) and float(value) == int(float(value)):
            return int(float(value))
        if kind == "number" and isinstance(value, str):
            return float(value)
        if kind == "string" and value is not None and not isinstance(value, str):
            return json.dumps(value) if isinstance(value, dict | list) else str(value)
    except (TypeError, ValueError, ArithmeticError):  # e.g. int(float("1e999"))
        return value
    choices = schema.get("enum")
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.0)
        return next((c for c in choices if str(c) == close[0]), value) if close else value
    return value


def value_program(schema: dict[str, Any], root: dict[str, Any], end: str = "") -> Program:
    schema = resolve(schema, root)
    kind = schema.get("type")
    if kind == "object" and schema.get("properties"):
        return (yield from object_program(schema, root))
    if kind == "string" or (schema.get("enum") and all(isinstance(c, str) for c in schema["enum"])):
        yield Force('"')
        return coerce((yield Read(prefix='"')), schema)
    typed = kind if kind in KINDS and not schema.get("enum") else None
    return coerce((yield Read(kind=typed, end=end)), schema)


def object_program(schema: dict[str, Any], root: dict[str, Any] | None = None) -> Program:
    """An object with every property of `schema` in order (a free object when it lists none)."""
    root = root if root is not None else schema
    schema = resolve(schema, root)
    properties = schema.get("properties") or {}
    if not properties:
        if schema.get("type") == "object" and schema.get("additionalProperties") is False:
            yield Force("{}")
            return {}
        yield Force("{")
        value = yield Read(prefix="{", max_tokens=160)
        return value if isinstance(value, dict) else {}
    built: dict[str, Any] = {}
    for i, (key, sub) in enumerate(properties.items()):
        yield Force(("{" if i == 0 else ", ") + json.dumps(key) + ":" + (" " if _is_text(sub, root) else ""))
        built[key] = yield from value_program(sub, root, "," if i < len(properties) - 1 else "}")
    yield Force("}")
    return built


def _is_text(schema: dict[str, Any], root: dict[str, Any]) -> bool:
    resolved = resolve(schema, root)
    return resolved.get("type") == "string" or bool(resolved.get("enum"))


def closest_name(written: Any, names: Sequence[str]) -> str:
    """The tool name the model meant: exact, a prefix either way, else the most similar."""
    text = str(written or "").strip()
    if not text:
        return names[0]
    if text in names:
        return text
    for name in names:
        if name.startswith(text) or text.startswith(name):
            return name
    close = difflib.get_close_matches(text, list(names), n=1, cutoff=0.0)
    return close[0] if close else names[0]


def tool_call_program(
    parameters: dict[str, dict[str, Any]], name: str | None = None, *, opened: bool = False
) -> Program:
    """One `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. `parameters`: tool name -> its
    parameters schema; `name`: the tool to call (None: the model picks); `opened`: the worker has
    already written the opening tag."""
    if not opened:
        yield Force(OPEN)
    if name is None:
        yield Force('{"name": "')
        name = closest_name((yield Read(prefix='"', max_tokens=16)), list(parameters))
        yield Force(', "arguments": ')
    else:
        yield Force('{"name": ' + json.dumps(name) + ', "arguments": ')
    schema = parameters[name] or {"type": "object", "properties": {}}
    if not schema.get("properties"):
        schema = {**schema, "type": "object", "additionalProperties": False}
    arguments = yield from object_program(schema)
    yield Force("}" + CLOSE)
    raw = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return ParsedToolCall(name, arguments, raw)


# ---- running a program against a run --------------------------------------------------------------
class GuidedWriter:
    """Drives `worker` of `run` through `program`; call `observe(record)` after every step."""

    def __init__(self, run: HogwildRun, worker: int, program: Program) -> None:
        self.run, self.worker, self.program = run, worker, program
        self.read: Read | None = None
        self.buffer = ""
        self.read_ids: list[int] = []  # tokens written for the current value (decoded together, so
        # characters split across tokens come out whole)
        self.closer = ""  # closes a value cut short, prepended to the next forced text
        self.trailing = ""  # what the model wrote after the value it just finished
        self.value: Any = None
        self.finished_program = False
        self.done = False
        self._own_processors = list(run.logits_processors[worker])  # the caller's, kept in place
        self._advance(None, first=True)

    @property
    def _worker_finished(self) -> bool:
        return self.run.workers[self.worker].finished

    def _advance(self, sent: Any, *, first: bool = False) -> None:
        """Send the value just read; force every text up to the next Read (or the program's end)."""
        forced = ""
        try:
            instruction = next(self.program) if first else self.program.send(sent)
            while isinstance(instruction, Force) or (instruction is not None and self._worker_finished):
                if isinstance(instruction, Force):
                    forced += instruction.text
                    instruction = self.program.send(None)
                else:  # the worker stopped (EOS or budget): no more text comes, values stay empty
                    instruction = self.program.send(salvage(instruction.prefix, instruction.prefix)[0])
            self.read, self.buffer, self.read_ids = instruction, instruction.prefix, []
        except StopIteration as stop:
            self.value, self.read, self.finished_program = stop.value, None, True
        self._constrain()
        forced = skip_written(self.trailing, forced)
        if forced and not self._worker_finished:
            self.run.force(self.worker, self.closer + forced)
        self.closer, self.trailing = "", ""
        if self.finished_program and (not forced or self._worker_finished):
            self.done = True

    def _constrain(self) -> None:
        """Install the type mask of the value being read (if typed); remove it otherwise."""
        processors = list(self._own_processors)
        if self.read is not None and self.read.kind is not None:
            kind, end = self.read.kind, self.read.end
            processors.append(TypedValueProcessor(self.run.engine, kind, lambda: self.buffer, end))
        self.run.logits_processors[self.worker] = processors

    def observe(self, record: StepRecord) -> None:
        if self.done:
            return
        if self.read is None:  # the program's closing text was taken in this step
            self.done = True
            return
        if record.sources.get(self.worker) == "sampled":
            self.read_ids.extend(record.chosen.get(self.worker, ()))
            self.buffer = self.read.prefix + self.run.engine.decode(self.read_ids)
        status, value, end = scan_value(self.buffer)
        if status == "complete":
            self.trailing = self.buffer[end:]
            self._advance(value)
        elif status == "invalid" or self._worker_finished or len(self.read_ids) >= self.read.max_tokens:
            value, self.closer = salvage(self.buffer, self.read.prefix)
            self._advance(value)
