"""Tiny random-weight configs of the decoder families transformers ships, and what the engine must do with
each: run it exactly, or refuse it at construction (`refusal`: a pattern of the UnsupportedModelError).

Used by tests/test_model_families.py and by scripts/model_support.py (the README's support table).
Every config is small (hidden 64, 2-4 layers) so that a family's checks take seconds on a CPU; sliding
windows are 16 tokens, so that the tests' prompts span several windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import transformers as T

WINDOW = 16  # sliding window / chunk of the tiny configs that have one
BASE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    vocab_size=49152,  # the embedded SmolLM2 tokenizer's
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MLA = dict(
    num_key_value_heads=4,  # multi-head latent attention: one key and value per query head
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    moe_intermediate_size=32,
    n_group=1,
    topk_group=1,
)


@dataclass(frozen=True)
class Family:
    """A decoder family: its tiny config, and the refusal expected (None: it must run exactly)."""

    name: str
    config: Callable[[], Any]
    refusal: str | None = None
    note: str = ""  # what the tiny config exercises

    @property
    def supported(self) -> bool:
        return self.refusal is None


def tiny(config_class: type, **overrides: Any) -> Callable[[], Any]:
    return lambda: config_class(**{**BASE, **overrides})


FAMILIES = [
    Family("llama", tiny(T.LlamaConfig, rope_theta=10000.0), note="plain RoPE, GQA"),
    Family(
        "llama3-rope",
        tiny(
            T.LlamaConfig,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        ),
        note="Llama 3 RoPE scaling",
    ),
    Family(
        "llama-yarn",
        tiny(
            T.LlamaConfig,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        ),
        note="YaRN (attention scaling applied once)",
    ),
    Family("mistral", tiny(T.MistralConfig, sliding_window=WINDOW), note="sliding window on every layer"),
    Family(
        "mixtral",
        tiny(T.MixtralConfig, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
        note="MoE, sliding window",
    ),
    Family(
        "qwen2",
        tiny(
            T.Qwen2Config,
            num_hidden_layers=4,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=2,
        ),
        note="sliding window on the layers from max_window_layers on",
    ),
    Family("qwen2-moe", tiny(T.Qwen2MoeConfig, **MOE, shared_expert_intermediate_size=32), note="MoE"),
    Family("qwen3", tiny(T.Qwen3Config, head_dim=16), note="q/k norms"),
    Family("qwen3-moe", tiny(T.Qwen3MoeConfig, head_dim=16, **MOE), note="MoE, q/k norms"),
    Family("gemma", tiny(T.GemmaConfig, head_dim=16), note="scaled embeddings"),
    Family(
        "gemma2",
        tiny(
            T.Gemma2Config,
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        note="logit soft-capping, alternating sliding windows, query_pre_attn_scalar",
    ),
    Family(
        "gemma3",
        tiny(
            T.Gemma3TextConfig,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=WINDOW,
            sliding_window_pattern=2,
        ),
        note="local and global layers with their own RoPE bases",
    ),
    Family(
        "gemma3n",
        tiny(
            T.Gemma3nTextConfig,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=WINDOW,
            num_kv_shared_layers=2,
        ),
        refusal="shares keys and values across layers",
    ),
    Family("phi3", tiny(T.Phi3Config), note="fused qkv"),
    Family(
        "phi4-mini",
        tiny(T.Phi3Config, partial_rotary_factor=0.75, original_max_position_embeddings=1024),
        note="partial rotary (Phi-4-mini)",
    ),
    Family("phi", tiny(T.PhiConfig, partial_rotary_factor=0.5), note="partial rotary, parallel blocks"),
    Family("phimoe", tiny(T.PhimoeConfig, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    Family("glm", tiny(T.GlmConfig, head_dim=16), note="interleaved partial rotary"),
    Family("glm4", tiny(T.Glm4Config, head_dim=16), note="interleaved partial rotary, extra norms"),
    Family(
        "glm4-moe",
        tiny(
            T.Glm4MoeConfig,
            head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            n_group=1,
            topk_group=1,
        ),
        note="partial rotary, MoE",
    ),
    Family("gpt-neox", tiny(T.GPTNeoXConfig, rotary_pct=0.25), note="partial rotary (Pythia)"),
    Family(
        "gpt-oss",
        tiny(T.GptOssConfig, head_dim=16, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
        note="attention sinks, alternating sliding windows",
    ),
    Family("deepseek-v2", tiny(T.DeepseekV2Config, **MLA), note="multi-head latent attention, complex RoPE"),
    Family("deepseek-v3", tiny(T.DeepseekV3Config, **MLA), note="multi-head latent attention"),
    Family("granite", tiny(T.GraniteConfig, attention_multiplier=0.3), note="attention multiplier"),
    Family(
        "granite-moe",
        tiny(T.GraniteMoeConfig, attention_multiplier=0.3, num_local_experts=4, num_experts_per_tok=2),
    ),
    Family("olmo2", tiny(T.Olmo2Config), note="q/k norms over all heads"),
    Family("olmoe", tiny(T.OlmoeConfig, num_experts=4, num_experts_per_tok=2)),
    Family("cohere", tiny(T.CohereConfig), note="interleaved rotary, parallel blocks"),
    Family(
        "cohere2",
        tiny(T.Cohere2Config, num_hidden_layers=4, sliding_window=WINDOW, sliding_window_pattern=2),
        note="sliding layers with RoPE, global layers without (NoPE)",
    ),
    Family("smollm3", tiny(T.SmolLM3Config, no_rope_layer_interval=2), note="NoPE layers"),
    Family("starcoder2", tiny(T.Starcoder2Config, sliding_window=WINDOW), note="sliding window, biases"),
    Family(
        "llama4-text",
        tiny(
            T.Llama4TextConfig,
            head_dim=16,
            attention_chunk_size=WINDOW,
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size_mlp=128,
            attn_temperature_tuning=False,
            no_rope_layers=[1, 0],
        ),
        note="chunked attention, complex RoPE, NoPE layers, MoE",
    ),
    Family("ernie4.5", tiny(T.Ernie4_5Config, head_dim=16), note="interleaved rotary"),
    Family(
        "ernie4.5-moe",
        tiny(T.Ernie4_5_MoeConfig, head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=32),
        note="interleaved rotary, MoE",
    ),
    Family(
        "exaone4",
        tiny(
            T.Exaone4Config, num_hidden_layers=4, head_dim=16, sliding_window=WINDOW, sliding_window_pattern=2
        ),
        note="sliding layers with RoPE, global layers without",
    ),
    Family(
        "exaone-moe",
        tiny(
            T.ExaoneMoeConfig,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=WINDOW,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        note="sliding and NoPE layers, MoE",
    ),
    Family("hunyuan-dense", tiny(T.HunYuanDenseV1Config, head_dim=16), note="q/k norms"),
    Family(
        "minicpm3",
        tiny(
            T.MiniCPM3Config,
            num_key_value_heads=4,
            q_lora_rank=32,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=12,
        ),
        note="multi-head latent attention",
    ),
    Family("glm4-moe-lite", tiny(T.Glm4MoeLiteConfig, **MLA), note="multi-head latent attention, MoE"),
    Family(
        "dots1",
        tiny(
            T.Dots1Config,
            head_dim=16,
            n_routed_experts=4,
            n_shared_experts=1,
            num_experts_per_tok=2,
            first_k_dense_replace=1,
            moe_intermediate_size=32,
            n_group=1,
            topk_group=1,
        ),
        note="MoE",
    ),
    Family("seed-oss", tiny(T.SeedOssConfig, head_dim=16)),
    Family("apertus", tiny(T.ApertusConfig), note="xIELU activation, q/k norms"),
    Family("arcee", tiny(T.ArceeConfig)),
    Family("helium", tiny(T.HeliumConfig, head_dim=16), note="interleaved rotary"),
    Family("persimmon", tiny(T.PersimmonConfig, partial_rotary_factor=0.5), note="partial rotary, q/k norms"),
    Family("olmo", tiny(T.OlmoConfig)),
    Family("olmo3", tiny(T.Olmo3Config, num_hidden_layers=4, sliding_window=WINDOW), note="sliding layers"),
    Family("flex-olmo", tiny(T.FlexOlmoConfig, num_experts=4, num_experts_per_tok=2), note="MoE"),
    Family("bitnet", tiny(T.BitNetConfig), note="ternary linear layers, sub-norms"),
    Family(
        "vaultgemma",
        tiny(T.VaultGemmaConfig, head_dim=16, sliding_window=WINDOW),
        note="logit soft-capping, sliding layers",
    ),
    Family("ministral", tiny(T.MinistralConfig, head_dim=16, sliding_window=WINDOW), note="sliding window"),
    Family("internlm3", tiny(T.InternLM3Config, head_dim=16)),
    Family("cwm", tiny(T.CwmConfig, head_dim=16, sliding_window=WINDOW), note="sliding layers"),
    Family(
        "granite-moe-shared",
        tiny(
            T.GraniteMoeSharedConfig, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32
        ),
        note="MoE with a shared expert",
    ),
    Family("lfm2", tiny(T.Lfm2Config, layer_types=["full_attention"] * 2), note="attention layers only"),
    Family(
        "afmoe",
        tiny(
            T.AfmoeConfig,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=WINDOW,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
        ),
        note="sliding and NoPE layers, gated attention, MoE",
    ),
    Family("nanochat", tiny(T.NanoChatConfig), note="RoPE turning the other way"),
    Family("minimax-m2", tiny(T.MiniMaxM2Config, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    Family("solar-open", tiny(T.SolarOpenConfig, head_dim=16), note="MoE"),
    Family("jais2", tiny(T.Jais2Config)),
    Family(
        "llama4-text-temperature",
        tiny(
            T.Llama4TextConfig,
            head_dim=16,
            attention_chunk_size=WINDOW,
            num_local_experts=4,
            num_experts_per_tok=1,
            intermediate_size_mlp=128,
            no_rope_layers=[1, 0],
        ),
        refusal="attn_temperature_tuning",
        note="query scale by token index on NoPE layers",
    ),
    Family("lfm2-conv", tiny(T.Lfm2Config, layer_types=["conv", "full_attention"]), refusal="'conv'"),
    Family(
        "qwen3-next",
        tiny(
            T.Qwen3NextConfig,
            num_hidden_layers=4,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        ),
        refusal="'linear_attention'",
    ),
    Family(
        "qwen3.5-text",
        tiny(T.Qwen3_5TextConfig, num_hidden_layers=4, head_dim=16),
        refusal="'linear_attention'",
    ),
    Family("falcon-h1", tiny(T.FalconH1Config, head_dim=16), refusal="'hybrid'"),
    Family("jamba", tiny(T.JambaConfig, num_experts=4, num_experts_per_tok=2), refusal="no rotary"),
    Family(
        "nemotron", tiny(T.NemotronConfig, partial_rotary_factor=0.5), refusal="without the keyword arguments"
    ),
    Family("diffllama", tiny(T.DiffLlamaConfig, head_dim=16), refusal="layer_idx"),
    Family(
        "gptj",
        lambda: T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, vocab_size=49152, eos_token_id=2),
        refusal="precomputed table",
    ),
    Family(
        "bloom",
        lambda: T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=49152),
        refusal="no rotary",
    ),
    Family(
        "opt",
        lambda: T.OPTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=49152
        ),
        refusal="no rotary",
    ),
    Family(
        "stablelm",
        tiny(T.StableLmConfig, partial_rotary_factor=0.25),
        refusal="without the keyword arguments",
    ),
    Family(
        "falcon",
        tiny(T.FalconConfig, new_decoder_architecture=True, num_kv_heads=2),
        refusal="without the keyword arguments",
    ),
    Family(
        "gpt2", lambda: T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=49152), refusal="no rotary"
    ),
    Family(
        "llama-dynamic-ntk",
        tiny(T.LlamaConfig, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        refusal="depend on the sequence length",
    ),
]
FAMILIES_BY_NAME = {family.name: family for family in FAMILIES}
