"""A validated request as a ChatHogwild call, and the call's reply as OpenAI's chat.completion JSON."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from hogwild_agents.server import schemas
from hogwild_agents.server.config import ServerConfig
from hogwild_agents.server.errors import APIError, bad_request

OPENAI_FINISH_REASONS = ("stop", "length", "tool_calls")
_FINISH_REASONS = {"timeout": "length"}  # a run's own reasons OpenAI has no name for


@dataclass(frozen=True)
class Call:
    """One request as a ChatHogwild call: `messages`, and `options` for `ainvoke`/`astream` (stop,
    tools, per-call settings). `reasoning`: the run has a protocol, so its workers' writing is reasoning
    and the answer comes after it."""

    id: str
    created: int
    model: str
    messages: list[BaseMessage]
    options: dict[str, Any]
    stream: bool
    include_usage: bool
    parallel_tool_calls: bool
    reasoning: bool


def prepare(request: schemas.ChatCompletionRequest, config: ServerConfig) -> Call:
    """The ChatHogwild call for `request`, with the server's defaults for what it leaves out."""
    if request.model != config.model_name:
        raise APIError(
            f"The model {request.model!r} does not exist; this server serves {config.model_name!r}.",
            status=404,
            param="model",
            code="model_not_found",
        )
    max_tokens = request.max_new_tokens or config.max_tokens
    if max_tokens > config.max_tokens_limit:
        param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        raise bad_request(
            f"{param} is {max_tokens}, more than this server's limit of {config.max_tokens_limit} tokens "
            "per worker; ask for fewer.",
            param=param,
            code="max_tokens_exceeded",
        )
    if "protocol" in request.model_fields_set:
        protocol = None if request.protocol in (None, schemas.RAW_PROTOCOL) else request.protocol
    else:
        protocol = config.protocol
    options: dict[str, Any] = {
        "n_workers": request.n_workers or config.n_workers,
        "protocol": protocol,
        "layout": request.layout or config.layout,
        "max_tokens": max_tokens,
        "temperature": config.temperature if request.temperature is None else request.temperature,
        "top_p": config.top_p if request.top_p is None else request.top_p,
        "seed": request.seed,
        "stop": request.stops,
        "timeout_s": config.timeout_s,
    }
    if request.tools:
        options["tools"] = [
            tool.model_dump(exclude_none=True, exclude={"function": {"strict"}}) for tool in request.tools
        ]
        options["tool_choice"] = _tool_choice(request.tool_choice)
    if request.response_format is not None and request.response_format.type != "text":
        schema = getattr(getattr(request.response_format, "json_schema", None), "schema_", None)
        options["response_format"] = {"type": "json_schema", "schema": schema or {}}
    return Call(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=config.model_name,
        messages=to_langchain(request.messages),
        options=options,
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        reasoning=protocol is not None,
    )


def _tool_choice(choice: Any) -> str | None:
    if choice is None or choice == "auto":
        return None
    if isinstance(choice, schemas.NamedToolChoice):
        return choice.function.name
    return choice  # "none" or "required"


def to_langchain(messages: list[Any]) -> list[BaseMessage]:
    """OpenAI messages as LangChain messages. A tool result gets the name of the call it answers."""
    converted: list[BaseMessage] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        text = schemas.message_text(message.content)
        if isinstance(message, schemas.SystemMessage):
            converted.append(SystemMessage(text))
        elif isinstance(message, schemas.UserMessage):
            converted.append(HumanMessage(text, name=message.name))
        elif isinstance(message, schemas.AssistantMessage):
            calls = [
                _call(call, f"messages[{i}].tool_calls[{j}]")
                for j, call in enumerate(message.tool_calls or ())
            ]
            call_names.update((call["id"], call["name"]) for call in calls)
            converted.append(AIMessage(text, tool_calls=calls))
        else:
            converted.append(
                ToolMessage(
                    text, tool_call_id=message.tool_call_id, name=call_names.get(message.tool_call_id)
                )
            )
    return converted


def _call(call: schemas.ToolCallParam, param: str) -> dict[str, Any]:
    try:
        arguments = json.loads(call.function.arguments or "{}")
    except json.JSONDecodeError as error:
        raise bad_request(
            f"The arguments of tool call {call.id!r} are not valid JSON ({error}).",
            param=f"{param}.function.arguments",
        ) from None
    if not isinstance(arguments, dict):
        raise bad_request(
            f"The arguments of tool call {call.id!r} must be a JSON object.",
            param=f"{param}.function.arguments",
        )
    return {"name": call.function.name, "args": arguments, "id": call.id, "type": "tool_call"}


# ---- the reply -----------------------------------------------------------------------------------
def finish_reason(reason: str | None) -> str:
    """A run's finish reason as one of OpenAI's ("timeout" -> "length"; a cancelled run -> "stop")."""
    reason = _FINISH_REASONS.get(reason or "stop", reason)
    return reason if reason in OPENAI_FINISH_REASONS else "stop"


def openai_tool_calls(message: AIMessage, parallel: bool) -> list[dict[str, Any]]:
    """The message's tool calls (malformed ones too, with their raw arguments) in OpenAI's format."""
    calls = [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"], "arguments": json.dumps(c["args"])},
        }
        for c in message.tool_calls
    ]
    calls += [
        {
            "id": c["id"],
            "type": "function",
            "function": {"name": c["name"] or "", "arguments": c["args"] or ""},
        }
        for c in message.invalid_tool_calls
    ]
    return calls if parallel else calls[:1]


def usage(
    message: AIMessage, answer: str, reasoning: bool, count_tokens: Callable[[str], int]
) -> dict[str, Any]:
    """OpenAI usage: the prompt once, completion tokens over all workers; with a protocol, the tokens
    that are not the answer count as reasoning tokens."""
    meta = message.usage_metadata or {}
    prompt, completion = meta.get("input_tokens", 0), meta.get("output_tokens", 0)
    counts: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": (meta.get("input_token_details") or {}).get("cache_read", 0)
        },
    }
    if reasoning:
        counts["completion_tokens_details"] = {"reasoning_tokens": max(0, completion - count_tokens(answer))}
    return counts


def workers(message: AIMessage) -> list[dict[str, Any]]:
    """Each worker's text and counts (the `hogwild_workers` extension field)."""
    return [
        {
            "index": i,
            "name": w["name"],
            "text": w["text"],
            "finish_reason": w["finish_reason"],
            "generated_tokens": w["generated_tokens"],
        }
        for i, w in enumerate(message.response_metadata.get("workers", ()))
    ]


def completion(call: Call, message: AIMessage, count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """The chat.completion object for a finished call."""
    answer = message.content if isinstance(message.content, str) else message.text
    tool_calls = openai_tool_calls(message, call.parallel_tool_calls)
    reply: dict[str, Any] = {"role": "assistant", "content": answer if answer or not tool_calls else None}
    if call.reasoning:
        transcripts = message.additional_kwargs.get("reasoning_content", "")
        reply["reasoning_content"] = reply["reasoning"] = transcripts
    if tool_calls:
        reply["tool_calls"] = tool_calls
    reply["hogwild_workers"] = workers(message)
    return {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.model,
        "choices": [
            {
                "index": 0,
                "message": reply,
                "finish_reason": finish_reason(message.response_metadata.get("finish_reason")),
                "logprobs": None,
            }
        ],
        "usage": usage(message, answer, call.reasoning, count_tokens),
    }
