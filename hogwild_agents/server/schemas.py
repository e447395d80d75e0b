"""The chat.completions request, validated: OpenAI's fields (and the Hogwild extra body fields) as pydantic
models. Unknown fields and values this server cannot honour are refused (`request_error`), never ignored
silently; fields that only label a request (user, metadata, ...) are accepted and have no effect."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from hogwild_agents.engine import MAX_WORKERS
from hogwild_agents.protocol import shipped_protocols
from hogwild_agents.server.errors import APIError, bad_request
from hogwild_agents.views import LAYOUTS

MAX_STOP_SEQUENCES = 16
RAW_PROTOCOL = "none"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- messages ------------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: str


def _text_parts_only(content: Any) -> Any:
    if isinstance(content, list):
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "refusal"):
                raise ValueError(f"content parts of type {kind!r} are not supported; send text parts only")
    return content


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallParam(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None

    _parts = field_validator("content", mode="before")(_text_parts_only)


class UserMessage(_Strict):
    role: Literal["user"]
    content: str | list[TextPart]
    name: str | None = None

    _parts = field_validator("content", mode="before")(_text_parts_only)


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | list[TextPart | RefusalPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    reasoning_content: str | None = None  # a previous reply's reasoning, sent back: not re-read
    reasoning: str | None = None

    _parts = field_validator("content", mode="before")(_text_parts_only)


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str

    _parts = field_validator("content", mode="before")(_text_parts_only)


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


def message_text(content: str | list[TextPart | RefusalPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content if isinstance(part, TextPart))


# ---- tools and output formats ---------------------------------------------------------------------
class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolParam(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    type: Literal["json_object"]


class JsonSchema(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchema


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # nothing is obfuscated here


# ---- the request ---------------------------------------------------------------------------------
class ChatCompletionRequest(_Strict):
    """POST /v1/chat/completions. `max_tokens` is per worker. Hogwild extra body fields: `n_workers`,
    `protocol` (a shipped protocol, or "none"/null for raw workers), `layout`."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = None
    # sampling options with no effect here: only their neutral values are accepted
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    # labels of the request, accepted with no effect
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # Hogwild extra body fields (defaults: the server's settings)
    n_workers: int | None = Field(default=None, ge=1, le=MAX_WORKERS)
    protocol: str | None = None
    layout: Literal[LAYOUTS] | None = None  # type: ignore[valid-type]

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported (one run per request); send n separate requests")
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stop

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        if value:
            raise ValueError("penalties are not supported; leave them out or send 0")
        return value

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("top_logprobs are not supported")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @field_validator("protocol")
    @classmethod
    def _shipped_protocol(cls, protocol: str | None) -> str | None:
        names = shipped_protocols()
        if protocol is not None and protocol != RAW_PROTOCOL and protocol not in names:
            raise ValueError(
                f"unknown protocol {protocol!r}; use one of {', '.join(names)}, or 'none' for raw workers"
            )
        return protocol

    @field_validator("tools")
    @classmethod
    def _unique_tools(cls, tools: list[ToolParam] | None) -> list[ToolParam] | None:
        names = [tool.function.name for tool in tools or ()]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(cls, choice: Any, info: ValidationInfo) -> Any:
        names = [tool.function.name for tool in info.data.get("tools") or ()]
        if choice is not None and not names:
            raise ValueError("tool_choice is only allowed when tools are specified")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"the function {choice.function.name!r} is not among the tools {names}")
        return choice

    @property
    def max_new_tokens(self) -> int | None:
        """The requested tokens per worker (`max_completion_tokens`, else the older `max_tokens`)."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The request in `body` (JSON), or an APIError saying what is wrong with it."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"The request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as error:
        raise request_error(error) from None


def request_error(error: ValidationError) -> APIError:
    """A validation problem as an OpenAI error naming the field (`param`, like "messages[0].content").
    Of several (one per member of a union), the most specific one: the deepest location."""
    errors = error.errors(include_url=False)
    first = max(errors, key=lambda e: len(e["loc"]))
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param=param)
    message = first["msg"].removeprefix("Value error, ")
    where = f"{param}: " if param else ""
    return bad_request(f"Invalid request: {where}{message}", param=param or None)


def _param(loc: tuple[int | str, ...]) -> str:
    """A location as a field path; union tags and member labels (which name no field) are left out."""
    path, previous, skip = "", None, False
    for part in loc:
        if skip:
            skip = False
        elif isinstance(part, int):
            path += f"[{part}]"
            skip = previous == "messages"
        elif not _is_member_label(part):
            path += f".{part}" if path else part
            skip = part == "response_format"
        previous = part
    return path


def _is_member_label(part: str) -> bool:
    """Labels pydantic gives union members: types (`str`, `list[TextPart]`), model and literal names."""
    return (
        part in ("str", "int", "float", "bool", "none")
        or part[:1].isupper()
        or any(c in part for c in "[]'(")
    )
