"""HogwildEngine: a loaded model, its scheduler and KV pool, and the entry points to run workers.

- `submit(prompt, **options)` queues a run on the scheduler and returns a `RunHandle` at once (events,
  result, cancel); `generate` waits for one result, `generate_many` for many that share forwards.
- `start(prompt, **options)` returns a `HogwildRun` with its own cache, to drive step by step
  (`step`, `force`, `inject`, `view_token_ids`): the API for experiments.

`compile=True` runs every decode forward (each row feeding one token) through the static decode step
(`static_step.py`), compiled with `torch.compile` and, on CUDA, replayed as CUDA graphs; multi-token
forwards (prompts, forced and tool text) keep the eager path.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hogwild_agents import chat, validation
from hogwild_agents.architecture import check_config, inspect_model
from hogwild_agents.attention import ATTENTION_NAME, AttentionFn, eager_attention, fast_attention
from hogwild_agents.attention import register as register_attention
from hogwild_agents.cache import KVPool, KVShape
from hogwild_agents.encoding import TextEncoder
from hogwild_agents.errors import InvalidArgumentError
from hogwild_agents.handle import RunHandle
from hogwild_agents.hooks import DEFAULT_TIMEOUT_S, EngineTool, Hooks, ToolRunner
from hogwild_agents.loading import load_model_and_tokenizer
from hogwild_agents.logits_processing import LogitsProcessorsArg
from hogwild_agents.plan import ForwardPlan
from hogwild_agents.prompt_cache import DEFAULT_MAX_BYTES as DEFAULT_PREFIX_BYTES
from hogwild_agents.prompt_cache import PromptCache
from hogwild_agents.results import HogwildResult, StepEvent, StepRecord
from hogwild_agents.run import HogwildRun, RunController, RunLimits
from hogwild_agents.sampling import SamplingParams
from hogwild_agents.scheduler import DEFAULT_BATCH_TOKENS, Scheduler
from hogwild_agents.script import RunScript
from hogwild_agents.static_step import StaticDecodeStep
from hogwild_agents.views import LAYOUTS, Layout

MAX_WORKERS = 64
Messages = str | Sequence[dict[str, str]]


class HogwildEngine:
    """One causal LM shared by every run. Submitted runs share forwards through one scheduler over one
    pooled KV cache, capped at `max_cache_bytes` (default: `cache_memory_fraction` of the device memory
    free when the engine is made); `max_batch_tokens` bounds the multi-token writes (prompt chunks,
    forced and tool text) per forward. `compile`: run decode forwards through the compiled static step
    (see the module docstring; the first forward of each bucket compiles, which takes a while).
    `prefix_cache_bytes` bounds the K/V of recent prompts kept for reuse by later runs."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_cache_bytes: int | None = None,
        cache_memory_fraction: float = 0.5,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        prefix_cache_bytes: int = DEFAULT_PREFIX_BYTES,
        compile: bool = False,
    ) -> None:
        check_config(model.config)
        register_attention()
        model.set_attn_implementation(ATTENTION_NAME)
        self.model = model.eval()
        self.tokenizer = tokenizer
        # each layer's rotation, window and K/V shape, probed; refuses what cannot be exact
        self.attention = inspect_model(self.model)
        self.rotations = self.attention.rotations
        self.n_layers = self.attention.n_layers
        self.kv_heads = self.attention.kv_heads
        self.head_dim = self.attention.k_dim
        self.max_positions = self.attention.max_positions
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().num_embeddings  # ids the model can embed
        self.prompt_cache = PromptCache(prefix_cache_bytes)  # K/V of recent prompts (and replies)
        self.encoder = TextEncoder(tokenizer)  # untrusted text never becomes control tokens
        self._no_mask = torch.zeros(1, 1, 1, 1, device=model.device)  # the hogwild attention needs none
        self.kv_shape = KVShape.of(self.attention, model.dtype, model.device)
        check_engine_options(
            max_cache_bytes=max_cache_bytes,
            cache_memory_fraction=cache_memory_fraction,
            max_batch_tokens=max_batch_tokens,
            prefix_cache_bytes=prefix_cache_bytes,
            compile=compile,
        )
        if max_cache_bytes is None:
            max_cache_bytes = int(cache_memory_fraction * free_memory_bytes(model.device))
        self.compile = compile
        # the static decode step for single-token forwards (None: every forward runs eagerly)
        self.decode_step: StaticDecodeStep | None = StaticDecodeStep(model, compile=True) if compile else None
        self.scheduler = Scheduler(
            lambda plan, attend: self.forward(plan, attend),  # looked up per call: wrappable
            self.new_pool(max_cache_bytes),
            max_batch_tokens,
        )

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
        **engine_options: Any,
    ) -> HogwildEngine:
        """Load `model` (None: the embedded SmolLM2-135M-Instruct; a path, model id, .gguf file, or a
        (model, tokenizer) pair) on `device` (default CUDA if available) with `dtype` (default fp32 on
        CPU, bf16 on GPU). `engine_options`: those of the constructor (max_cache_bytes, ...), checked
        before anything loads."""
        check_engine_options(**engine_options)
        loaded, tokenizer = load_model_and_tokenizer(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(loaded, tokenizer, **engine_options)

    # ---- model facts ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def busy(self) -> bool:
        """True while any submitted run is queued or running."""
        return self.scheduler.busy

    def new_pool(self, max_bytes: int | None = None) -> KVPool:
        """An empty KV pool of this model's shape (the scheduler's, or a stepped run's private cache).
        Compiled, it holds a scratch page and grows when pages are reserved (at a run's admission), so
        that decoding does not change its storage (a new storage size compiles the buckets again)."""
        pool = KVPool(self.kv_shape, self.attention, max_bytes, grow_on_reserve=self.compile)
        if self.compile:
            pool.scratch_page()
        return pool

    def encode(self, text: str, *, trusted: bool = True) -> list[int]:
        """Token ids of `text`. Untrusted text (`trusted=False`, or the untrusted spans of a MarkedText
        such as a rendered chat prompt) is encoded with special tokens split: it never yields the ids of
        control tokens like end-of-turn markers."""
        return self.encoder.encode(text, trusted)

    def check_token_ids(self, token_ids: Sequence[int], what: str = "token ids") -> list[int]:
        """`token_ids` as a list of ints, each a token of this model's vocabulary (else a clear error)."""
        return validation.token_ids(token_ids, self.vocab_size, what)

    def check_ids_or_encode(self, text_or_ids: str | Sequence[int], what: str) -> list[int]:
        """Untrusted text given to a run (`inject`, `force`) as token ids, or checked token ids."""
        if isinstance(text_or_ids, str):
            return self.encode(text_or_ids, trusted=False)
        return self.check_token_ids(text_or_ids, f"{what}: token ids")

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat_prompt(self, messages: Messages, tools: Sequence[dict] | None = None) -> str:
        """Render messages (and tool schemas) through the model's chat template, ending with the
        assistant's turn; the messages' contents are marked untrusted. See `chat.render` (a template
        that refuses a system role, a tokenizer without a template)."""
        return chat.render(self.tokenizer, messages, tools=tools)

    def forward(self, plan: ForwardPlan, attend: AttentionFn = fast_attention) -> torch.Tensor:
        """One forward pass over a KV pool; returns the last-token logits of each row [rows, vocab] (fp32).
        Decode forwards go through the static step when the engine has one (`compile=True`), except
        with the eager reference attention."""
        if self.decode_step is not None and plan.single_tokens and attend is not eager_attention:
            return self.decode_step(plan)
        with torch.inference_mode():
            out = self.model(
                input_ids=plan.input_ids,
                position_ids=plan.position_ids,
                attention_mask=self._no_mask,  # a 4D mask is used as given: no mask is built
                use_cache=False,
                logits_to_keep=plan.last_index,
                hogwild_plan=plan,
                hogwild_attend=attend,
            )
        return out.logits[0].float()

    # ---- runs ----------------------------------------------------------------------------------
    def script(
        self,
        prompt: Messages,
        n_workers: int,
        layout: Layout,
        protocol: Any,
        tools: Sequence[dict] | None = None,
    ) -> RunScript:
        """The run script: raw (protocol=None), a given RunScript, or a protocol rendered for the task."""
        if isinstance(protocol, RunScript):
            return protocol
        if protocol is None:
            text = prompt if isinstance(prompt, str) and not tools else self.chat_prompt(prompt, tools)
            return RunScript.raw(text, n_workers)
        from hogwild_agents.protocol import Protocol

        resolved = protocol if isinstance(protocol, Protocol) else Protocol(protocol)
        return resolved.render(
            self.tokenizer, prompt, n_workers, layout, tools=list(tools) if tools else None
        )

    def prompt_token_ids(
        self,
        prompt: Messages | Sequence[int],
        *,
        n_workers: int = 2,
        layout: Layout = "combined",
        protocol: Any = None,
        tools: Sequence[dict] | None = None,
        engine_tools: Sequence[Any] | ToolRunner | None = None,
        **_run_options: Any,
    ) -> list[int]:
        """The prompt tokens `start` prefills for this prompt and these options (what the run's
        `usage.prompt_tokens` counts); accepts every option of `start` and ignores those that do not
        shape the prompt."""
        if _is_token_prompt(prompt):
            return self.check_token_ids(prompt, "prompt")
        schemas = _engine_tool_schemas(engine_tools)
        return self.encode(
            self.script(prompt, n_workers, layout, protocol, [*(tools or ()), *schemas]).prompt
        )

    def start(self, prompt: Messages | Sequence[int], **options: Any) -> HogwildRun:
        """Prefill the prompt and return a run to drive with `step()` (its own cache; not scheduled).
        Options: see `build_run`."""
        run = self.build_run(prompt, **options)
        run.setup()
        return run

    def submit(
        self, prompt: Messages | Sequence[int], *, controller: RunController | None = None, **options: Any
    ) -> RunHandle:
        """Queue a run on the scheduler and return its handle at once. Options: see `build_run`;
        `controller`: per-run logic called between steps (see `run.RunController`)."""
        run = self.build_run(prompt, pool=self.scheduler.pool, **options)
        return self.scheduler.submit(run, controller)

    def generate(
        self,
        prompt: Messages | Sequence[int],
        *,
        on_step: Callable[[StepRecord], None] | None = None,
        **options: Any,
    ) -> HogwildResult:
        """Run to completion (sharing forwards with any other submitted run); options: see `build_run`."""
        handle = self.submit(prompt, **options)
        try:
            if on_step is not None:
                for event in handle.events():
                    if isinstance(event, StepEvent):
                        on_step(event.record)
            return handle.result()
        except BaseException:  # the caller gave up (an exception in on_step, Ctrl-C): stop the run
            handle.cancel()
            raise

    def generate_many(
        self, prompts: Sequence[Messages | Sequence[int]], **options: Any
    ) -> list[HogwildResult]:
        """Run every prompt at once (their forwards shared), each with the same options; results in
        order. Per-prompt options: use `submit` for each and collect the handles' results."""
        handles = [self.submit(prompt, **options) for prompt in prompts]
        try:
            return [handle.result() for handle in handles]
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise

    def build_run(
        self,
        prompt: Messages | Sequence[int],
        *,
        n_workers: int = 2,
        layout: Layout = "combined",
        protocol: Any = None,
        max_new_tokens: int = 256,
        max_total_tokens: int | None = None,
        max_context: int | None = None,
        max_forward_passes: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] | str | None = None,
        timeout_s: float | None = None,
        tools: Sequence[dict] | None = None,
        engine_tools: Sequence[Any] | ToolRunner | None = None,
        tool_timeout_s: float = DEFAULT_TIMEOUT_S,
        hooks: Hooks | None = None,
        attention: str = "fast",
        record_views: bool = False,
        logits_processors: LogitsProcessorsArg = None,
        pool: KVPool | None = None,
    ) -> HogwildRun:
        """A run, validated and ready to prefill (nothing is computed yet).

        `prompt`: text (used verbatim when protocol is None), chat messages (role/content dicts, rendered
        with the model's chat template), or token ids (raw runs only). `protocol`: None (no collaboration
        text: each worker continues the prompt), a shipped protocol name, a Protocol, or a RunScript.
        `tools`: OpenAI-format tool schemas rendered into the prompt (by the protocol, or by the model's
        chat template when protocol is None). `engine_tools`: tools run INSIDE the run (LangChain tools
        or typed callables): a call written by any worker runs with `tool_timeout_s`, and its result
        becomes a shared block every worker sees; their schemas join `tools` in the prompt.
        `hooks`: callbacks (on_step, on_token, on_tool_call, on_tool_result, on_step_finished).
        `max_context`: the longest view a worker may attend to (prompt, shared history and steps), below
        the model's own context: a longer prompt is refused, and a worker whose view reaches it finishes
        with "length".
        `max_forward_passes`: the forwards the run may take after its prompt (every step, chunked write
        and tool result, and the finisher's answer): near the cap every worker finishes with "length"
        and the finisher answers inside it (`HogwildResult.forward_passes` counts them).
        `attention`: "fast" (batched matmuls), "triton" (a Triton kernel, CUDA) or "eager" (reference).
        `record_views`: put each fed worker's exact view (token ids) into its StepRecord (for inspection
        and tests; it copies every view, every step).
        `logits_processors`: transformers-style `LogitsProcessor`s (called as processor(input_ids, scores))
        applied to every worker's sampled tokens, or {worker index: processors} for some workers only;
        `input_ids` is the prompt followed by that worker's stream. StepRecord.logits stays the model's.
        `pool`: the KV pool the run's cache lives in (None: a private one).
        """
        n_workers = validation.positive_integer(n_workers, "n_workers", MAX_WORKERS)
        validation.choice(layout, LAYOUTS, "layout")
        stop = validation.stop_strings(stop)
        token_prompt = _is_token_prompt(prompt)
        if token_prompt and protocol is not None:
            raise ValueError("Token-id prompts run without a protocol; pass text or messages instead.")
        if token_prompt:
            prompt = self.check_token_ids(prompt, "prompt")
        else:
            _check_prompt_text(prompt)
        runner = engine_tools
        if engine_tools is not None and not isinstance(engine_tools, ToolRunner):
            runner = ToolRunner(engine_tools, timeout_s=tool_timeout_s)
        prompt_tools = [*(tools or ()), *_engine_tool_schemas(runner)]
        script = self.script("" if token_prompt else prompt, n_workers, layout, protocol, prompt_tools)
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        return HogwildRun(
            self,
            script,
            layout=layout,
            sampling=SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
            limits=RunLimits(
                max_new_tokens=max_new_tokens,
                max_total_tokens=max_total_tokens,
                stop=stops,
                timeout_s=timeout_s,
                max_context=max_context,
                max_forward_passes=max_forward_passes,
            ),
            attention=attention,
            prompt_ids=list(prompt) if token_prompt else None,
            tool_runner=runner,
            owns_tool_runner=runner is not engine_tools,
            hooks=hooks,
            record_views=record_views,
            logits_processors=logits_processors,
            pool=pool,
        )


def check_engine_options(
    *,
    max_cache_bytes: int | None = None,
    cache_memory_fraction: float = 0.5,
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
    prefix_cache_bytes: int = DEFAULT_PREFIX_BYTES,
    compile: bool = False,
) -> None:
    """Refuse engine options that cannot work (InvalidArgumentError), before any weights load."""
    if max_cache_bytes is not None:
        validation.positive_integer(max_cache_bytes, "max_cache_bytes")
    fraction = validation.real(cache_memory_fraction, "cache_memory_fraction", "a number in (0, 1]")
    if not 0 < fraction <= 1:
        raise InvalidArgumentError(f"cache_memory_fraction must be in (0, 1], got {cache_memory_fraction}")
    validation.positive_integer(max_batch_tokens, "max_batch_tokens")
    validation.integer(prefix_cache_bytes, "prefix_cache_bytes", minimum=0)
    if not isinstance(compile, bool):
        raise InvalidArgumentError(f"compile must be True or False, got {compile!r}")


def _engine_tool_schemas(engine_tools: Sequence[Any] | ToolRunner | None) -> list[dict[str, Any]]:
    """The prompt schemas of in-engine tools (a runner's, or those of the tools it would be made of)."""
    if isinstance(engine_tools, ToolRunner):
        return engine_tools.schemas
    return [EngineTool.from_any(tool).schema for tool in engine_tools or ()]


def _is_token_prompt(prompt: Any) -> bool:
    """A non-empty sequence of numbers (not text, not messages)."""
    if isinstance(prompt, str) or not isinstance(prompt, Sequence) or not prompt:
        return False
    return isinstance(prompt[0], numbers.Number)


def _check_prompt_text(prompt: Any) -> None:
    """Refuse prompt text (or message contents) that is not valid Unicode, before anything renders it."""
    if isinstance(prompt, str):
        validation.text(prompt, "The prompt")
        return
    for i, message in enumerate(prompt if isinstance(prompt, Sequence) else ()):
        if isinstance(message, Mapping):
            content = message.get("content")
        else:  # a LangChain message
            content = getattr(message, "content", None)
        if isinstance(content, str):
            validation.text(content, f"The content of message {i}")


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def free_memory_bytes(device: torch.device) -> int:
    """Memory free on `device` now: the GPU's free memory, or the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size) if pages > 0 and size > 0 else 2**34
