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

import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hogwild_agents import attention
from hogwild_agents.cache import KVPool, KVShape
from hogwild_agents.handle import RunHandle
from hogwild_agents.hooks import DEFAULT_TIMEOUT_S, Hooks, ToolRunner
from hogwild_agents.loading import check_rope_support, load_model_and_tokenizer
from hogwild_agents.logits_processing import LogitsProcessorsArg
from hogwild_agents.plan import ForwardPlan
from hogwild_agents.prompt_cache import PromptCache
from hogwild_agents.results import HogwildResult, StepEvent, StepRecord
from hogwild_agents.rotary import Rotations
from hogwild_agents.run import HogwildRun, RunController, RunLimits
from hogwild_agents.sampling import SamplingParams
from hogwild_agents.scheduler import DEFAULT_BATCH_TOKENS, Scheduler
from hogwild_agents.script import RunScript
from hogwild_agents.static_step import StaticDecodeStep

MAX_WORKERS = 64
Messages = str | Sequence[dict[str, str]]


class HogwildEngine:
    """One causal LM shared by every run. Submitted runs share forwards through one scheduler over one
    pooled KV cache, capped at `max_cache_bytes` (default: `cache_memory_fraction` of the device memory
    free when the engine is made); `max_batch_tokens` bounds the multi-token writes (prompt chunks,
    forced and tool text) per forward. `compile`: run decode forwards through the compiled static step
    (see the module docstring; the first forward of each bucket compiles, which takes a while)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_cache_bytes: int | None = None,
        cache_memory_fraction: float = 0.5,
        max_batch_tokens: int = DEFAULT_BATCH_TOKENS,
        compile: bool = False,
    ) -> None:
        check_rope_support(model.config)
        attention.register()
        model.set_attn_implementation(attention.ATTENTION_NAME)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rotations = Rotations.from_model(model)
        config = model.config.get_text_config()
        self.n_layers = config.num_hidden_layers
        self.kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = self.rotations.head_dim
        self.max_positions = getattr(config, "max_position_embeddings", None) or 2**31
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]  # ids the model can embed
        self.prompt_cache = PromptCache()  # K/V of the last prompt, reused by a run that extends it
        self._special_pattern: re.Pattern[str] | bool | None = None
        self._no_mask = torch.zeros(1, 1, 1, 1, device=model.device)  # the hogwild attention needs none
        self.kv_shape = KVShape(self.n_layers, self.kv_heads, self.head_dim, model.dtype, model.device)
        if max_cache_bytes is None:
            if not 0 < cache_memory_fraction <= 1:
                raise ValueError(f"cache_memory_fraction must be in (0, 1], got {cache_memory_fraction}")
            max_cache_bytes = int(cache_memory_fraction * free_memory_bytes(model.device))
        elif max_cache_bytes <= 0:
            raise ValueError(f"max_cache_bytes must be > 0, got {max_cache_bytes}")
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
        CPU, bf16 on GPU). `engine_options`: those of the constructor (max_cache_bytes, ...)."""
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
        pool = KVPool(self.kv_shape, self.rotations, max_bytes, grow_on_reserve=self.compile)
        if self.compile:
            pool.scratch_page()
        return pool

    def encode(self, text: str, *, trusted: bool = True) -> list[int]:
        """Token ids of `text`. Untrusted text (tool output, injected text) is encoded with special
        tokens split, so marker-like text never becomes control tokens."""
        if not text:
            return []
        if trusted:
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_format(self, template: str, values: dict[str, str]) -> list[int]:
        """Token ids of `template` with `{name}` fields filled from `values` (untrusted text): the
        template's own special tokens stay control tokens, the rest is encoded with special tokens
        split, so a value cannot forge them. Ordinary text tokenizes as the whole string would."""
        ids: list[int] = []
        for piece, special in self._special_pieces(template):
            if special:
                ids.extend(self.encode(piece))
            else:
                for name, value in values.items():
                    piece = piece.replace("{" + name + "}", value)
                ids.extend(self.encode(piece, trusted=False))
        return ids

    def _special_pieces(self, text: str) -> list[tuple[str, bool]]:
        """`text` cut into (piece, is a special token of the tokenizer) pieces."""
        if self._special_pattern is None:
            specials = sorted(
                {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special},
                key=len,
                reverse=True,
            )
            self._special_pattern = (
                re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else False
            )
        if not self._special_pattern:
            return [(text, False)]
        parts = self._special_pattern.split(text)
        return [(part, i % 2 == 1) for i, part in enumerate(parts) if part]

    def check_token_ids(self, token_ids: Sequence[int]) -> list[int]:
        """`token_ids` as a list of ints, each a token of this model's vocabulary (else a clear error)."""
        ids = []
        for t in token_ids:
            if isinstance(t, bool) or not isinstance(t, int | torch.Tensor) or int(t) != t:
                raise ValueError(f"token ids must be integers, got {t!r}")
            if not 0 <= int(t) < self.vocab_size:
                raise ValueError(f"token id {int(t)} is outside the vocabulary (0..{self.vocab_size - 1})")
            ids.append(int(t))
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def chat_prompt(self, messages: Messages, tools: Sequence[dict] | None = None) -> str:
        """Render messages (and tool schemas) through the model's chat template, ending with the
        assistant's turn."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not messages:
            raise ValueError("The message list is empty; give at least one message.")
        return self.tokenizer.apply_chat_template(
            list(messages), tools=list(tools) if tools else None, tokenize=False, add_generation_prompt=True
        )

    def forward(
        self, plan: ForwardPlan, attend: attention.AttentionFn = attention.fast_attention
    ) -> torch.Tensor:
        """One forward pass over a KV pool; returns the last-token logits of each row [rows, vocab] (fp32).
        Decode forwards go through the static step when the engine has one (`compile=True`), except
        with the eager reference attention."""
        if self.decode_step is not None and plan.single_tokens and attend is not attention.eager_attention:
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
        layout: str,
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
        layout: str = "combined",
        protocol: Any = None,
        max_new_tokens: int = 256,
        max_total_tokens: int | None = None,
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
        max_context: int | None = None,
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
        `attention`: "fast" (batched matmuls), "triton" (a Triton kernel, CUDA) or "eager" (reference).
        `record_views`: put each fed worker's exact view (token ids) into its StepRecord (for inspection
        and tests; it copies every view, every step).
        `logits_processors`: transformers-style `LogitsProcessor`s (called as processor(input_ids, scores))
        applied to every worker's sampled tokens, or {worker index: processors} for some workers only;
        `input_ids` is the prompt followed by that worker's stream. StepRecord.logits stays the model's.
        `max_context`: a context limit below the model's own (every worker's view stays within it).
        `pool`: the KV pool the run's cache lives in (None: a private one).
        """
        if not 1 <= n_workers <= MAX_WORKERS:
            raise ValueError(f"n_workers must be between 1 and {MAX_WORKERS}, got {n_workers}")
        token_prompt = not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], int)
        if token_prompt:
            prompt = self.check_token_ids(prompt)
        if token_prompt and protocol is not None:
            raise ValueError("Token-id prompts run without a protocol; pass text or messages instead.")
        runner = engine_tools
        if engine_tools is not None and not isinstance(engine_tools, ToolRunner):
            runner = ToolRunner(engine_tools, timeout_s=tool_timeout_s)
        prompt_tools = [*(tools or ()), *(runner.schemas if runner else ())]
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
                max_positions=max_context,
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
