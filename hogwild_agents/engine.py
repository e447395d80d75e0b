"""HogwildEngine: a loaded model plus the entry points `start` (a steppable run) and `generate`."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from hogwild_agents import attention
from hogwild_agents.hooks import DEFAULT_TIMEOUT_S, EngineTool, Hooks, ToolRunner
from hogwild_agents.loading import check_rope_support, load_model_and_tokenizer
from hogwild_agents.logits_processing import LogitsProcessorsArg
from hogwild_agents.plan import ForwardPlan
from hogwild_agents.prompt_cache import PromptCache
from hogwild_agents.results import HogwildResult, StepRecord
from hogwild_agents.rotary import Rotations
from hogwild_agents.run import HogwildRun, RunLimits
from hogwild_agents.sampling import SamplingParams
from hogwild_agents.script import RunScript

MAX_WORKERS = 64
Messages = str | Sequence[dict[str, str]]


class HogwildEngine:
    """One causal LM shared by every run; runs execute one at a time on it."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
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
        self.lock = threading.RLock()
        self.prompt_cache = PromptCache()  # K/V of the last prompt, reused by a run that extends it

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike | tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        trust_remote_code: bool = False,
    ) -> HogwildEngine:
        """Load `model` (None: the embedded SmolLM2-135M-Instruct; a path, model id, .gguf file, or a
        (model, tokenizer) pair) on `device` (default CUDA if available) with `dtype` (default fp32 on
        CPU, bf16 on GPU)."""
        loaded, tokenizer = load_model_and_tokenizer(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code
        )
        return cls(loaded, tokenizer)

    # ---- model facts ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

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
        """One forward pass over the shared cache; returns the last-token logits of each row (fp32)."""
        with torch.inference_mode():
            out = self.model(
                input_ids=plan.input_ids,
                position_ids=plan.position_ids,
                use_cache=False,
                logits_to_keep=1,
                hogwild_plan=plan,
                hogwild_attend=attend,
            )
        return out.logits[:, -1].float()

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

    def prompt_token_ids(
        self,
        prompt: Messages | Sequence[int],
        *,
        n_workers: int = 2,
        layout: str = "combined",
        protocol: Any = None,
        tools: Sequence[dict] | None = None,
        engine_tools: Sequence[Any] | ToolRunner | None = None,
        **_run_options: Any,
    ) -> list[int]:
        """The prompt tokens `start` prefills for this prompt and these options (what the run's
        `usage.prompt_tokens` counts); accepts every option of `start` and ignores those that do not
        shape the prompt."""
        if not isinstance(prompt, str) and prompt and isinstance(prompt[0], int):
            return [int(t) for t in prompt]
        schemas = _engine_tool_schemas(engine_tools)
        return self.encode(
            self.script(prompt, n_workers, layout, protocol, [*(tools or ()), *schemas]).prompt
        )

    def start(
        self,
        prompt: Messages | Sequence[int],
        *,
        n_workers: int = 2,
        layout: str = "combined",
        protocol: Any = None,
        max_new_tokens: int = 256,
        max_total_tokens: int | None = None,
        max_context: int | None = None,
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
    ) -> HogwildRun:
        """Prefill the prompt and return a run to drive with `step()`.

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
        `attention`: "fast" (batched matmuls), "triton" (a Triton kernel, CUDA) or "eager" (reference).
        `record_views`: put each fed worker's exact view (token ids) into its StepRecord (for inspection
        and tests; it copies every view, every step).
        `logits_processors`: transformers-style `LogitsProcessor`s (called as processor(input_ids, scores))
        applied to every worker's sampled tokens, or {worker index: processors} for some workers only;
        `input_ids` is the prompt followed by that worker's stream. StepRecord.logits stays the model's.
        """
        if not 1 <= n_workers <= MAX_WORKERS:
            raise ValueError(f"n_workers must be between 1 and {MAX_WORKERS}, got {n_workers}")
        token_prompt = not isinstance(prompt, str) and bool(prompt) and isinstance(prompt[0], int)
        if token_prompt and protocol is not None:
            raise ValueError("Token-id prompts run without a protocol; pass text or messages instead.")
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
                max_context=max_context,
                stop=stops,
                timeout_s=timeout_s,
            ),
            attention=attention,
            prompt_ids=list(prompt) if token_prompt else None,
            tool_runner=runner,
            owns_tool_runner=runner is not engine_tools,
            hooks=hooks,
            record_views=record_views,
            logits_processors=logits_processors,
        )

    def generate(
        self,
        prompt: Messages | Sequence[int],
        *,
        on_step: Callable[[StepRecord], None] | None = None,
        **options: Any,
    ) -> HogwildResult:
        """Run to completion and return the result; options are those of `start`."""
        with self.lock:
            run = self.start(prompt, **options)
            try:
                while not run.done:
                    record = run.step()
                    if on_step is not None:
                        on_step(record)
                run.conclude()  # the protocol's finisher, when the budget ended without an answer
                return run.result()
            finally:
                run.close()


def _engine_tool_schemas(engine_tools: Sequence[Any] | ToolRunner | None) -> list[dict[str, Any]]:
    """The prompt schemas of in-engine tools (a runner's, or those of the tools it would be made of)."""
    if isinstance(engine_tools, ToolRunner):
        return engine_tools.schemas
    return [EngineTool.from_any(tool).schema for tool in engine_tools or ()]


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
