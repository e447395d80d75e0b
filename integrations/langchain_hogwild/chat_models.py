"""ChatHogwild: N workers of one local LLM writing in parallel over one shared KV cache, as a chat model."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar, Token
from operator import itemgetter
from typing import Any, Literal

import torch
from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput, ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, convert_to_messages
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig, RunnableMap, RunnablePassthrough, ensure_config
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from transformers import RepetitionPenaltyLogitsProcessor

from hogwild_agents import validation
from hogwild_agents.chat import renders_tools, with_system_text
from hogwild_agents.engine import MAX_WORKERS, HogwildEngine
from hogwild_agents.errors import HogwildError, InvalidArgumentError
from hogwild_agents.grammar import json_schema_grammar, tool_call_grammar
from hogwild_agents.hooks import Hooks
from hogwild_agents.loading import check_model_reference, model_config, resolve_device, resolve_dtype
from hogwild_agents.logits_processing import LogitsProcessorsArg, per_worker_processors
from hogwild_agents.protocol import WORKER_NAMES, Protocol
from hogwild_agents.sampling import SamplingParams
from hogwild_agents.tool_calls import OPEN
from hogwild_agents.views import Layout
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
from langchain_hogwild._messages import to_chat_messages
from langchain_hogwild._output import message_fields
from langchain_hogwild._profile import model_profile
from langchain_hogwild._registry import get_engine, loaded, release
from langchain_hogwild._streaming import ChunkMaker
from langchain_hogwild._tools import (
    normalize_tool_choice,
    to_call_chunks,
    tool_instructions,
)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PROVIDER = "hogwild"
_CALL_OPTIONS = (
    "n_workers",
    "protocol",
    "layout",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "max_tokens",
    "max_context",
    "seed",
    "timeout_s",
    "reasoning",
)
# keyword arguments LangChain itself passes to a call (bind_tools, with_structured_output, stream=...)
_LANGCHAIN_CALL_KWARGS = (
    "tools",
    "tool_choice",
    "response_format",
    "ls_structured_output_format",
    "stop",
    "stream",
    "parallel_tool_calls",
)


class ChatHogwild(BaseChatModel):
    """Hogwild! Inference as a LangChain chat model: `n_workers` instances of one local model write at
    once over one shared KV cache, each seeing the others' tokens as they appear.

    The returned AIMessage's content is the run's final answer; every worker's transcript is in
    `additional_kwargs["reasoning_content"]` and `response_metadata["workers"]` (`reasoning=False` leaves
    them out). `usage_metadata` counts the shared prompt once and the tokens of all workers, the workers'
    tokens that are not the answer as `output_token_details["reasoning"]`; `response_metadata` has
    `model_provider` and `timings` (total, prefill and decode seconds).

    Streaming: every worker's tokens are sent live as custom events named "hogwild_token" (data:
    worker, name, text, source, step; see `astream_events` / `on_custom_event`), so a UI can show all
    workers typing. The answer itself is streamed as content while it is written only when it is one
    worker's plain text: protocol None, and no tools or structured output. With a protocol, the answer is
    only known when the run ends (any worker may give it), so it arrives in one chunk at the end. The
    last chunk (`chunk_position="last"`) carries usage, metadata, transcripts and tool calls.

    Tools (`bind_tools`): schemas go into the prompt (through the chat template when it renders tools,
    else as a system text in the default `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
    format). The first complete call by any worker ends the run. `tool_choice` "any"/"required" or a
    tool's name is enforced, and so is a call a worker opens by itself: a grammar (llguidance) allows
    worker 0 (or that worker) only tokens that keep the text a call of a bound tool whose arguments
    validate against its parameters schema.

    Structured output: "function_calling" (default) is a forced tool call; "json_schema" and
    "json_mode" (with or without a schema) make worker 0 write compact JSON under the schema's grammar,
    so the answer always parses and validates (strings, arrays, enums, nested and optional fields,
    bounded numbers, ...). With tools bound too and tool_choice auto, worker 0 writes either a tool call
    or the JSON answer. A worker that runs out of tokens mid-value is steered to close it in time.

    Weights load on first use; instances with the same (model, device, dtype, compile) share one
    engine, and concurrent calls on it share its forwards (its scheduler batches every active run).
    Cancelling an async call, or closing a stream early (`break` out of `stream`, `aclose()` on
    `astream`), stops its run at the next step. `close()` (or leaving a `with ChatHogwild(...) as llm:`
    block) unloads the shared weights once no other open instance uses them.
    """

    model: str | None = Field(default=None, validation_alias=AliasChoices("model", "model_name"))
    """Model path, id or .gguf file; None: the embedded SmolLM2-135M-Instruct. Also accepted as
    `model_name` (LangChain's other spelling); the `model_name` property gives the name in use."""
    n_workers: int = 2
    protocol: str | None = "collaborate"
    """A shipped protocol name, or None for raw workers (chat template only)."""
    layout: Layout = "combined"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    """Sample among the k most likely tokens only (0: no limit)."""
    repetition_penalty: float = 1.0
    """Divide the scores of tokens already in the prompt or the worker's own stream by this (> 1
    penalises repeats; 1.0: off), as transformers' RepetitionPenaltyLogitsProcessor does."""
    max_tokens: int = 256
    """Tokens each worker may generate."""
    max_context: int | None = None
    """The longest view (tokens) a worker may attend to: prompt, shared history and steps; None: the
    model's context. A longer prompt is refused (ContextLengthError); a worker reaching it stops."""
    reasoning: bool = True
    """Return the workers' transcripts (`reasoning_content`, worker texts in `response_metadata`);
    False: only the answer (the workers still collaborate)."""
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
    timeout_s: float | None = Field(default=None, validation_alias=AliasChoices("timeout_s", "timeout"))
    """Wall-clock limit of one call's run (also accepted as LangChain's standard `timeout`): when it
    passes, every worker stops (finish_reason "timeout") and what was written so far is returned."""
    attention: Literal["fast", "triton", "eager"] = "fast"
    """Attention implementation: "fast" (batched matmuls), "triton" (CUDA kernel), "eager" (reference)."""
    logits_processors: Any = Field(default=None, exclude=True, repr=False)
    """transformers `LogitsProcessor`s for every worker, or {worker index: [...]} for some (see
    `HogwildEngine.start`)."""

    streaming: bool = False
    """LangChain's `streaming` flag: when True, `invoke`/`ainvoke` run through the streaming path (so
    streaming callbacks get every chunk)."""
    max_retries: int = 0
    """LangChain's standard parameter, accepted for compatibility: a local run has no transient failures,
    so calls are never retried (an int >= 0)."""
    api_key: SecretStr | None = Field(default=None, exclude=True, repr=False)
    """LangChain's standard parameter, accepted so provider-agnostic code (`init_chat_model(...,
    api_key=...)`, shared configs) runs unchanged. A local model needs no key: it is never used, and it is
    kept as a SecretStr that is left out of repr, dumps, serialization, traces and error messages."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)
    _closed: bool = PrivateAttr(default=False)

    def __init__(self, **settings: Any) -> None:
        """Settings are checked here, without loading any weights; a bad or unknown one raises an
        InvalidArgumentError saying what to change (never quoting `api_key`)."""
        _check_standard_settings(settings)
        try:
            super().__init__(**settings)
            return
        except ValidationError as error:
            message = _describe(error, type(self))
        # raised outside the handler: the ValidationError (which quotes inputs) is not its context either
        raise InvalidArgumentError(message)

    # ---- checks of the settings (no weights are loaded) -------------------------------------------
    @field_validator("model", mode="before")
    @classmethod
    def _check_model(cls, value: Any) -> Any:
        check_model_reference(value)
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _check_api_key(cls, value: Any) -> Any:
        if value is None or isinstance(value, (str, SecretStr)):
            return value
        raise InvalidArgumentError(
            f"api_key must be a string or None, got a {type(value).__name__} (ChatHogwild does not use it)"
        )

    @field_validator("n_workers", mode="before")
    @classmethod
    def _check_workers(cls, value: Any) -> int:
        return validation.positive_integer(value, "n_workers", MAX_WORKERS)

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _check_max_tokens(cls, value: Any) -> int:
        return validation.positive_integer(value, "max_tokens")

    @field_validator("max_retries", mode="before")
    @classmethod
    def _check_retries(cls, value: Any) -> int:
        return validation.integer(value, "max_retries", minimum=0)

    @field_validator("temperature", mode="before")
    @classmethod
    def _check_temperature(cls, value: Any) -> float:
        return SamplingParams(temperature=value).temperature

    @field_validator("top_p", mode="before")
    @classmethod
    def _check_top_p(cls, value: Any) -> float:
        return SamplingParams(top_p=value).top_p

    @field_validator("top_k", mode="before")
    @classmethod
    def _check_top_k(cls, value: Any) -> int:
        return SamplingParams(top_k=value).top_k

    @field_validator("repetition_penalty", mode="before")
    @classmethod
    def _check_repetition_penalty(cls, value: Any) -> float:
        penalty = validation.real(value, "repetition_penalty", "a finite number > 0 (1.0: off)")
        if penalty <= 0:
            raise InvalidArgumentError(f"repetition_penalty must be > 0 (1.0: off), got {value}")
        return penalty

    @field_validator("max_context", mode="before")
    @classmethod
    def _check_max_context(cls, value: Any) -> int | None:
        return None if value is None else validation.positive_integer(value, "max_context")

    @field_validator("seed", mode="before")
    @classmethod
    def _check_seed(cls, value: Any) -> int | None:
        return validation.seed(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> list[str] | None:
        return None if value is None else list(validation.stop_strings(value))

    @field_validator("timeout_s", mode="before")
    @classmethod
    def _check_timeout(cls, value: Any) -> float | None:
        return validation.timeout(value, "timeout_s")

    @field_validator("tool_timeout_s", mode="before")
    @classmethod
    def _check_tool_timeout(cls, value: Any) -> float | None:
        return validation.timeout(value, "tool_timeout_s", optional=False)

    @field_validator("protocol", mode="before")
    @classmethod
    def _check_protocol(cls, value: Any) -> str | None:
        if value is not None:
            Protocol(value)  # an unknown name or a broken template fails here, with the template's name
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _check_device(cls, value: Any) -> str | None:
        if value is not None:
            resolve_device(value)
        return value

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: Any) -> str | None:
        if value is not None:
            resolve_dtype(value, torch.device("cpu"))
        return value

    @model_validator(mode="after")
    def _check_workers_have_names(self) -> ChatHogwild:
        if self.protocol is not None and self.n_workers > len(WORKER_NAMES):
            raise InvalidArgumentError(
                f"n_workers={self.n_workers} is more than the {len(WORKER_NAMES)} worker names a protocol "
                "has; use fewer workers, or protocol=None."
            )
        return self

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
            "top_k": self.top_k,
            "repetition_penalty": self.repetition_penalty,
            "max_tokens": self.max_tokens,
            "max_context": self.max_context,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider=PROVIDER,
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
        if self._closed:
            raise HogwildError("This ChatHogwild was closed; create a new instance to use the model again.")
        if self.engine is not None:
            return self.engine
        engine = get_engine(self.model, self.device, self.dtype, self.compile, user=self)
        if self.profile is not None and "max_input_tokens" not in self.profile:  # known only now
            for key, value in model_profile(self.model_name, engine.model.config, self.max_context).items():
                self.profile.setdefault(key, value)
        return engine

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop using the engine: the shared weights are dropped (and freed once nothing else holds
        them) when no other open ChatHogwild with the same (model, device, dtype, compile) uses them. A closed
        instance refuses further calls. A run in progress finishes first."""
        if self._closed:
            return
        self._closed = True
        if self.engine is None and release(self.model, self.device, self.dtype, self.compile, user=self):
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __enter__(self) -> ChatHogwild:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- model facts -----------------------------------------------------------------------------
    def _resolve_model_profile(self) -> ModelProfile | None:
        """Capabilities, and the context size when the config can be read without loading weights
        (filled in when the engine loads otherwise)."""
        if self.engine is not None:
            config = self.engine.model.config
        elif (engine := loaded(self.model, self.device, self.dtype, self.compile)) is not None:
            config = engine.model.config
        else:
            config = _config(self.model)
        return model_profile(self.model_name, config, self.max_context)

    # ---- tokens ----------------------------------------------------------------------------------
    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` with the model's own tokenizer (no special tokens added)."""
        if self.custom_get_token_ids is not None:
            return self.custom_get_token_ids(text)
        return self.get_engine().encode(text)

    def get_num_tokens_from_messages(
        self, messages: list[BaseMessage], tools: Sequence[Any] | None = None, **kwargs: Any
    ) -> int:
        """Exactly the prompt tokens a call with these messages (and tools, and call options such as
        n_workers, protocol or response_format in `kwargs`) feeds the model: chat template, protocol
        text, tool descriptions and structured-output instructions included. The call's own
        `usage_metadata["input_tokens"]` is the same number."""
        if tools:
            kwargs = {**kwargs, "tools": [convert_to_openai_tool(t) for t in tools]}
        spec = self._spec(convert_to_messages(messages), None, kwargs)
        return len(self.get_engine().prompt_token_ids(spec.messages, **spec.options))

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
        choice = normalize_tool_choice(tool_choice, [s["function"]["name"] for s in schemas])  # fail early
        if choice not in (None, "none") and schemas:
            tool_call_grammar(schemas, None if choice == "any" else choice)  # a schema it cannot enforce
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
        """Structured output as a forced tool call ("function_calling") or grammar-constrained JSON text
        ("json_schema"; "json_mode" too: valid against `schema` when one is given, else any object)."""
        if method == "function_calling":
            return super().with_structured_output(schema, include_raw=include_raw, **kwargs)
        if method not in ("json_schema", "json_mode"):
            raise ValueError(f"Unknown method {method!r}; use function_calling, json_schema or json_mode.")
        if kwargs:
            raise ValueError(f"Unsupported arguments {kwargs}")
        json_schema = convert_to_json_schema(schema) if schema is not None else {}
        if json_schema:
            json_schema_grammar(json_schema)  # a schema that cannot constrain output fails here
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
        native = renders_tools(engine.tokenizer)
        chat = to_chat_messages(messages, native_tools=native, call_markup=bool(tools))
        if tools and not native:
            chat = with_system_text(chat, tool_instructions(tools))
        if json_schema is not None:
            chat = with_system_text(chat, _json_instructions(json_schema))
        return chat, native

    def _spec(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]) -> CallSpec:
        _check_call_kwargs(kwargs)
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
            "max_context": settings["max_context"],
            "temperature": settings["temperature"],
            "top_p": settings["top_p"],
            "top_k": settings["top_k"],
            "seed": settings["seed"],
            "stop": list(stops or ()),
            "tools": tools if tools and native else None,
            "engine_tools": self.engine_tools or None,
            "tool_timeout_s": self.tool_timeout_s,
            "hooks": self.hooks,
            "timeout_s": settings["timeout_s"],
            "attention": self.attention,
            "logits_processors": _with_repetition_penalty(
                self.logits_processors, settings["repetition_penalty"], settings["n_workers"]
            ),
        }
        return CallSpec(
            chat,
            options,
            tools,
            choice,
            json_schema,
            reasoning=bool(settings["reasoning"]),
            parallel_tool_calls=bool(kwargs.get("parallel_tool_calls", True)),
        )

    def _settings(self, spec: CallSpec) -> dict[str, Any]:
        return {
            "model_provider": PROVIDER,
            "model_name": self.model_name,
            "protocol": spec.options["protocol"],
            "layout": spec.options["layout"],
            "n_workers": spec.options["n_workers"],
        }

    def _result(self, outcome: Outcome, spec: CallSpec) -> ChatResult:
        fields = message_fields(outcome, self._settings(spec), reasoning=spec.reasoning)
        info = {"finish_reason": fields["response_metadata"]["finish_reason"]}
        return ChatResult(generations=[ChatGeneration(message=AIMessage(**fields), generation_info=info)])

    def _last_chunk(self, outcome: Outcome, spec: CallSpec, content: str | list) -> ChatGenerationChunk:
        fields = message_fields(outcome, self._settings(spec), reasoning=spec.reasoning)
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
            reasoning=spec.reasoning and not raw,
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


def _check_call_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse call keyword arguments ChatHogwild does not use (instead of ignoring them)."""
    unknown = sorted(set(kwargs) - {*_CALL_OPTIONS, *_LANGCHAIN_CALL_KWARGS})
    if unknown:
        raise InvalidArgumentError(
            f"Unknown call option(s) {', '.join(map(repr, unknown))} for ChatHogwild; per-call options are "
            f"{', '.join(_CALL_OPTIONS)} (tools go through bind_tools, JSON output through "
            "with_structured_output)."
        )


_SECRET_SETTINGS = ("api_key",)


def _check_standard_settings(settings: dict[str, Any]) -> None:
    """LangChain's provider-agnostic settings that cannot mean anything for a model run in-process."""
    if settings.get("base_url") is not None:
        raise InvalidArgumentError(
            "base_url is not supported by ChatHogwild: it runs the model in this process, so there is "
            "no server to point at (pass `model` for the weights, or base_url=None). To talk to a model "
            "over HTTP, serve it with `hogwild serve` and use an OpenAI-compatible client such as "
            'langchain_openai.ChatOpenAI(base_url="http://127.0.0.1:8000/v1", ...).'
        )
    settings.pop("base_url", None)
    if "model" in settings and "model_name" in settings:
        name = settings.pop("model_name")
        if settings["model"] is None:
            settings["model"] = name
        elif name is not None and name != settings["model"]:
            raise InvalidArgumentError(
                f"model={settings['model']!r} and model_name={name!r} disagree; "
                "model_name is another spelling of model, pass one of them."
            )


def _setting_names(model: type[BaseModel]) -> list[str]:
    """Every name a setting may be given as: the fields and their aliases."""
    names = []
    for name, field in model.model_fields.items():
        names.append(name)
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias or field.alias]
        names.extend(choice for choice in choices if isinstance(choice, str) and choice not in names)
    return names


def _describe(error: ValidationError, model: type[BaseModel]) -> str:
    """A pydantic ValidationError as one message per bad setting, each saying what to change. A secret
    setting's value is never quoted."""
    problems = []
    for item in error.errors():
        name = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            close = difflib.get_close_matches(name, _setting_names(model), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"Unknown setting {name!r} for {model.__name__}{hint}")
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            known = not name or name in message  # our own messages name the setting and the value
            if known or name in _SECRET_SETTINGS:
                problems.append(message if known else f"{name}: {message}")
            else:
                problems.append(f"{name}: {message} (got {item.get('input')!r})")
    return " ".join(problems)


def _reset(var: ContextVar[Any], token: Token[Any]) -> None:
    """Undo `var.set`; a stream finalized from another context cannot, and need not."""
    with contextlib.suppress(ValueError):
        var.reset(token)


@functools.lru_cache(maxsize=16)
def _config(model: str | None) -> Any:
    """The model's config if readable without loading it (read once per model)."""
    return model_config(model)


def _with_repetition_penalty(
    processors: LogitsProcessorsArg, penalty: float, n_workers: int
) -> LogitsProcessorsArg:
    """The caller's logits processors, with transformers' repetition penalty first for every worker."""
    if penalty == 1.0:
        return processors
    if not penalty > 0:
        raise InvalidArgumentError(f"repetition_penalty must be > 0 (1.0: off), got {penalty}")
    penalise = RepetitionPenaltyLogitsProcessor(penalty)
    return {w: [penalise, *own] for w, own in enumerate(per_worker_processors(processors, n_workers))}


def _json_instructions(schema: dict[str, Any]) -> str:
    properties = schema.get("properties") or {}
    if not properties:
        return "Reply with one JSON object and nothing else."
    keys = ", ".join(
        f"{key} ({sub['description']})" if isinstance(sub, dict) and sub.get("description") else key
        for key, sub in properties.items()
    )
    return f"Reply with one JSON object and nothing else, with the keys: {keys}."
