"""ChatHogwild: N workers of one local LLM writing in parallel over one shared KV cache, as a chat model."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar, Token
from operator import itemgetter
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import ConfigDict, Field

from hogwild_agents.engine import HogwildEngine
from hogwild_agents.hooks import Hooks
from hogwild_agents.tool_calls import OPEN
from langchain_hogwild._calls import CallGroup, stream_calls
from langchain_hogwild._driver import CallSpec, Outcome, submit_call
from langchain_hogwild._events import (
    TOKEN_EVENT,
    adispatch,
    dispatch,
    event_payload,
    graph_writer,
    model_run,
    stream_sink,
)
from langchain_hogwild._messages import to_chat_messages, with_system_text
from langchain_hogwild._output import message_fields
from langchain_hogwild._registry import get_engine
from langchain_hogwild._streaming import ChunkMaker
from langchain_hogwild._tools import (
    normalize_tool_choice,
    template_renders_tools,
    to_call_chunks,
    tool_instructions,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_CALL_OPTIONS = (
    "n_workers",
    "protocol",
    "layout",
    "temperature",
    "top_p",
    "max_tokens",
    "seed",
    "timeout_s",
)


class ChatHogwild(BaseChatModel):
    """Hogwild! Inference as a LangChain chat model: `n_workers` instances of one local model write at
    once over one shared KV cache, each seeing the others' tokens as they appear.

    The returned AIMessage's content is the run's final answer; every worker's transcript is in
    `additional_kwargs["reasoning_content"]` and `response_metadata["workers"]`. `usage_metadata` counts
    the shared prompt once and the tokens of all workers.

    Streaming: every worker's tokens are sent live as custom events named "hogwild_token" (data:
    worker, name, text, source, step; see `astream_events` / `on_custom_event`), so a UI can show all
    workers typing. The answer itself is streamed as content while it is written only when it is one
    worker's plain text: protocol None, and no tools or structured output. With a protocol, the answer is
    only known when the run ends (any worker may give it), so it arrives in one chunk at the end. The
    last chunk (`chunk_position="last"`) carries usage, metadata, transcripts and tool calls.

    Tools (`bind_tools`): schemas go into the prompt (through the chat template when it renders tools,
    else as a system text in the default `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    format). The first complete call by any worker ends the run. `tool_choice` "any"/"required" or a
    tool's name is enforced: worker 0 is made to write the call's opening, the tool name and the
    argument keys, and writes the argument values itself.

    Structured output: "function_calling" (default) is a forced tool call; "json_schema" and
    "json_mode" force a JSON object with the schema's keys into worker 0's stream, the model writing
    the values. Integer, number and boolean values (here and in enforced tool arguments) are
    constrained while written: only tokens that keep them valid JSON of their type can be sampled.

    Weights load on first use; instances with the same (model, device, dtype, compile) share one
    engine, and calls on one engine run one at a time (async calls run in a worker thread). Cancelling
    an async call, or closing a stream early (`break` out of `stream`, `aclose()` on `astream`), stops
    its run between two steps and frees the engine.
    """

    model: str | None = None
    """Model path, id or .gguf file; None: the embedded SmolLM2-135M-Instruct."""
    n_workers: int = 2
    protocol: str | None = "collaborate"
    """A shipped protocol name, or None for raw workers (chat template only)."""
    layout: Literal["combined", "interleaved", "contiguous"] = "combined"
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 256
    """Tokens each worker may generate."""
    stop: list[str] | None = None
    seed: int | None = None
    device: str | None = None
    dtype: str | None = None
    compile: bool = False
    """Compile the engine's decode step (torch.compile; CUDA graphs on a GPU): faster steps after a
    one-off compilation per batch shape. Part of the key under which loaded engines are shared."""
    engine: HogwildEngine | None = Field(default=None, exclude=True, repr=False)
    """A loaded engine to use instead of loading `model`."""
    engine_tools: list[Any] | None = Field(default=None, exclude=True, repr=False)
    """Tools run INSIDE each run (LangChain tools or typed callables): a call by any worker runs at once
    and its result becomes a shared block every worker sees; calls and results are also sent as
    `hogwild_token` custom events with source "tool_call"/"tool_result"."""
    tool_timeout_s: float = 30.0
    """Time limit of one in-engine tool call."""
    hooks: Hooks | None = Field(default=None, exclude=True, repr=False)
    """Run callbacks (on_step, on_token, on_tool_call, on_tool_result, on_step_finished)."""
    timeout_s: float | None = None
    """Wall-clock limit of one call's run: when it passes, every worker stops (finish_reason "timeout")
    and what was written so far is returned."""
    attention: Literal["fast", "triton", "eager"] = "fast"
    """Attention implementation: "fast" (batched matmuls), "triton" (CUDA kernel), "eager" (reference)."""
    logits_processors: Any = Field(default=None, exclude=True, repr=False)
    """transformers `LogitsProcessor`s for every worker, or {worker index: [...]} for some (see
    `HogwildEngine.start`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    # ---- identity --------------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "hogwild"

    @property
    def model_name(self) -> str:
        return str(self.model) if self.model is not None else DEFAULT_MODEL_NAME

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "n_workers": self.n_workers,
            "protocol": self.protocol,
            "layout": self.layout,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="hogwild",
            ls_model_name=kwargs.get("model") or self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stops := stop or kwargs.get("stop") or self.stop:
            params["ls_stop"] = list(stops)
        return params

    def get_engine(self) -> HogwildEngine:
        """The engine this model runs on (loaded now if needed)."""
        if self.engine is not None:
            return self.engine
        return get_engine(self.model, self.device, self.dtype, self.compile)

    # ---- tokens ----------------------------------------------------------------------------------
    def get_num_tokens(self, text: str) -> int:
        return len(self.get_engine().encode(text))

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None
    ) -> int:
        """Tokens of the prompt these messages (and tools) render to, with the model's own tokenizer."""
        schemas = [convert_to_openai_tool(t) for t in tools or ()]
        engine = self.get_engine()
        chat, native = self._chat_messages(engine, messages, schemas, None)
        return len(engine.encode(engine.chat_prompt(chat, schemas if native else None)))

    # ---- tools and structured output ---------------------------------------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable | BaseTool],
        *,
        tool_choice: dict | str | bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (anything `convert_to_openai_tool` takes). `tool_choice`: "auto"/None, "none",
        "any"/"required"/True (some tool must be called), or a tool's name (that tool must be called)."""
        schemas = [convert_to_openai_tool(t) for t in tools]
        normalize_tool_choice(tool_choice, [s["function"]["name"] for s in schemas])  # fail early
        return super().bind(tools=schemas, tool_choice=tool_choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict | type,
        *,
        method: Literal["function_calling", "json_schema", "json_mode"] = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict | Any]:
        """Structured output as a forced tool call ("function_calling") or guided JSON text
        ("json_schema"; "json_mode" too, guided by `schema` when one is given)."""
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"Unknown method {method!r}; use function_calling, json_schema or json_mode.")
        if kwargs:
            raise ValueError(f"Unsupported arguments {kwargs}")
        json_schema = convert_to_json_schema(schema) if schema is not None else {}
        llm = self.bind(
            response_format={"type": "json_schema", "schema": json_schema},
            ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
        )
        is_pydantic = isinstance(schema, type) and is_basemodel_subclass(schema)
        parser = PydanticOutputParser(pydantic_object=schema) if is_pydantic else JsonOutputParser()
        if not include_raw:
            return llm | parser
        parse = RunnablePassthrough.assign(parsed=itemgetter("raw") | parser, parsing_error=lambda _: None)
        fallback = RunnablePassthrough.assign(parsed=lambda _: None)
        return RunnableMap(raw=llm) | parse.with_fallbacks([fallback], exception_key="parsing_error")

    # ---- building a call --------------------------------------------------------------------------
    def _chat_messages(
        self,
        engine: HogwildEngine,
        messages: Sequence[BaseMessage],
        tools: list[dict[str, Any]],
        json_schema: dict[str, Any] | None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Chat dicts for the engine, and whether the engine should render `tools` itself (a chat
        template that renders tools; it or the protocol then writes them into the prompt). Otherwise the
        tools are described in the system text as signatures: small models copy JSON schemas into
        their calls' arguments."""
        native = template_renders_tools(engine.tokenizer)
        chat = to_chat_messages(messages, native_tools=native, call_markup=bool(tools))
        if tools and not native:
            chat = with_system_text(chat, tool_instructions(tools))
        if json_schema is not None:
            chat = with_system_text(chat, _json_instructions(json_schema))
        return chat, native

    def _spec(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> CallSpec:
        engine = self.get_engine()
        settings = {name: kwargs.get(name, getattr(self, name)) for name in _CALL_OPTIONS}
        tools: list[dict[str, Any]] = list(kwargs.get("tools") or [])
        names = [t["function"]["name"] for t in tools]
        choice = normalize_tool_choice(kwargs.get("tool_choice"), names) if tools else None
        if choice == "none":
            tools = []
        response_format = kwargs.get("response_format")
        json_schema = None
        if isinstance(response_format, dict):
            json_schema = response_format.get("schema") or (response_format.get("json_schema") or {}).get(
                "schema", {}
            )
        chat, native = self._chat_messages(engine, messages, tools, json_schema)
        stops = stop if stop is not None else self.stop
        options = {
            "n_workers": settings["n_workers"],
            "layout": settings["layout"],
            "protocol": settings["protocol"],
            "max_new_tokens": settings["max_tokens"],
            "temperature": settings["temperature"],
            "top_p": settings["top_p"],
            "seed": settings["seed"],
            "stop": list(stops or ()),
            "tools": tools if tools and native else None,
            "engine_tools": self.engine_tools or None,
            "tool_timeout_s": self.tool_timeout_s,
            "hooks": self.hooks,
            "timeout_s": settings["timeout_s"],
            "attention": self.attention,
            "logits_processors": self.logits_processors,
        }
        return CallSpec(chat, options, tools, choice, json_schema)

    def _settings(self, spec: CallSpec) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "protocol": spec.options["protocol"],
            "layout": spec.options["layout"],
            "n_workers": spec.options["n_workers"],
        }

    def _result(self, outcome: Outcome, spec: CallSpec) -> ChatResult:
        fields = message_fields(outcome, self._settings(spec))
        info = {"finish_reason": fields["response_metadata"]["finish_reason"]}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(**fields), generation_info=info)])

    def _last_chunk(self, outcome: Outcome, spec: CallSpec, content: str | list) -> ChatGenerationChunk:
        fields = message_fields(outcome, self._settings(spec))
        chunks = to_call_chunks(fields.pop("tool_calls"), fields.pop("invalid_tool_calls"))
        fields["content"] = content
        message = AIMessageChunk(**fields, tool_call_chunks=chunks, chunk_position="last")
        return ChatGenerationChunk(message=message)

    def _chunks(self, spec: CallSpec) -> ChunkMaker:
        """How this call's run events become message chunks (see `ChunkMaker`)."""
        raw = spec.options["protocol"] is None
        live = raw and not spec.tools and spec.json_schema is None
        return ChunkMaker(
            answer_holds=[*spec.options["stop"], OPEN] if live else None,
            reasoning=not raw,
            n_workers=spec.options["n_workers"],
        )

    # ---- streaming entry points: give the worker events a run to belong to ----------------------------
    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> Iterator[AIMessageChunk]:
        config = {**ensure_config(config)}
        config["run_id"] = run_id = config.get("run_id") or uuid.uuid4()
        manager = CallbackManager.configure(
            config.get("callbacks"),
            inheritable_tags=config.get("tags"),
            inheritable_metadata=config.get("metadata"),
        )
        token = stream_sink.set((manager, run_id))
        try:
            yield from super().stream(input, config, **kwargs)
        finally:
            _reset(stream_sink, token)

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any
    ) -> AsyncIterator[AIMessageChunk]:
        config = {**ensure_config(config)}
        config["run_id"] = run_id = config.get("run_id") or uuid.uuid4()
        manager = AsyncCallbackManager.configure(
            config.get("callbacks"),
            inheritable_tags=config.get("tags"),
            inheritable_metadata=config.get("metadata"),
        )
        token = stream_sink.set((manager, run_id))
        calls = CallGroup()
        calls_token = stream_calls.set(calls)
        try:
            async for chunk in super().astream(input, config, **kwargs):
                yield chunk
        finally:
            await calls.stop()  # a stream closed early: stop its run now, not when it is garbage
            _reset(stream_calls, calls_token)
            _reset(stream_sink, token)

    def _generate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        token = model_run.set(run_manager)  # for `_stream` when langchain-core streams implicitly
        try:
            return super()._generate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            _reset(model_run, token)

    async def _agenerate_with_cache(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        token = model_run.set(run_manager)  # for `_astream` when langchain-core streams implicitly
        try:
            return await super()._agenerate_with_cache(messages, stop=stop, run_manager=run_manager, **kwargs)
        finally:
            _reset(model_run, token)

    # ---- sync ------------------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        spec = self._spec(messages, stop, kwargs)
        handle, call = submit_call(self.get_engine(), spec)
        writer = graph_writer()
        try:
            for event in handle.events():
                _report(run_manager, writer, event)
            result = handle.result()
        finally:
            handle.cancel()  # a no-op once the run has ended; else (an error here) stop it
        return self._result(call.outcome(result), spec)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        run_manager = run_manager or model_run.get()
        spec = self._spec(messages, stop, kwargs)
        chunks = self._chunks(spec)
        handle, call = submit_call(self.get_engine(), spec)
        writer = graph_writer()
        try:
            for event in handle.events():
                _report(run_manager, writer, event)
                yield from chunks.feed(event)
            result = handle.result()
        finally:
            handle.cancel()  # a stream closed early (from any thread) stops its run here
        outcome = call.outcome(result)
        yield self._last_chunk(outcome, spec, chunks.finish(outcome.content))

    # ---- async: the scheduler runs the call; its events are awaited without blocking the loop -------
    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        spec = await self._spec_in_thread_safe(messages, stop, kwargs)
        handle, call = submit_call(self.get_engine(), spec)
        writer = graph_writer()
        try:
            async for event in handle.aevents():
                await _areport(run_manager, writer, event)
            result = await handle.aresult()
        finally:
            await handle.acancel()
        return self._result(call.outcome(result), spec)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        run_manager = run_manager or model_run.get()
        spec = await self._spec_in_thread_safe(messages, stop, kwargs)
        chunks = self._chunks(spec)
        handle, call = submit_call(self.get_engine(), spec)
        if (group := stream_calls.get()) is not None:
            group.add(handle)
        writer = graph_writer()
        try:
            async for event in handle.aevents():
                await _areport(run_manager, writer, event)
                for chunk in chunks.feed(event):
                    yield chunk
            result = await handle.aresult()
        finally:
            await handle.acancel()
        outcome = call.outcome(result)
        yield self._last_chunk(outcome, spec, chunks.finish(outcome.content))

    async def _spec_in_thread_safe(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> CallSpec:
        """Build the call (this may load the engine) without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self._spec, messages, stop, kwargs)


def _report(manager: CallbackManagerForLLMRun | None, writer: Any, event: Any) -> None:
    """Send a run event to the call's callbacks (custom event) and to LangGraph's custom stream."""
    payload = event_payload(event)
    if payload is None:
        return
    dispatch(manager, [payload])
    if writer is not None:
        writer({"event": TOKEN_EVENT, **payload})


async def _areport(manager: AsyncCallbackManagerForLLMRun | None, writer: Any, event: Any) -> None:
    payload = event_payload(event)
    if payload is None:
        return
    await adispatch(manager, [payload])
    if writer is not None:
        writer({"event": TOKEN_EVENT, **payload})


def _reset(var: ContextVar[Any], token: Token[Any]) -> None:
    """Undo `var.set`; a stream finalized from another context cannot, and need not."""
    with contextlib.suppress(ValueError):
        var.reset(token)


def _json_instructions(schema: dict[str, Any]) -> str:
    properties = schema.get("properties") or {}
    if not properties:
        return "Reply with one JSON object and nothing else."
    keys = ", ".join(
        f"{key} ({sub['description']})" if isinstance(sub, dict) and sub.get("description") else key
        for key, sub in properties.items()
    )
    return f"Reply with one JSON object and nothing else, with the keys: {keys}."
