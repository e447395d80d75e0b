"""The models a benchmark runs: the embedded default, a local checkpoint, or random weights from a config.

Random-weight models (`--config`) need no download: `tiny` is a 2-layer Llama for smoke tests on CPU;
`smollm2-135m` has the embedded model's shapes (timings do not depend on the weights' values);
`qwen2.5-7b` and `llama3-8b` have the real architectures' shapes, for bandwidth-bound timings on a GPU.
They come with `CountingTokenizer`, which maps ids to text without a vocabulary, and their prompts are
a fixed pseudo-random id sequence repeated to the context length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

from hogwild_agents import HogwildEngine

PROMPT_TEXT = (
    "The river keeps a record of every storm in the shape of its banks. Engineers who study it walk "
    "the shore each spring, measure the new bends, and compare them with the maps of earlier years. "
)

CONFIGS: dict[str, dict] = {
    "tiny": dict(
        kind="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=32768,
        rope_theta=10000.0,
    ),
    "smollm2-135m": dict(
        kind="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        kind="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "llama3-8b": dict(
        kind="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
}


class CountingTokenizer:
    """The tokenizer surface the engine uses, for models without a vocabulary: ids become ``<id>``."""

    eos_token_id: int | None = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 256 for c in text]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{int(t)}>" for t in token_ids)


def config_for(name: str) -> PretrainedConfig:
    if name not in CONFIGS:
        raise ValueError(f"Unknown config {name!r}; choose one of {', '.join(CONFIGS)}.")
    fields = dict(CONFIGS[name])
    kind = fields.pop("kind")
    return (LlamaConfig if kind == "llama" else Qwen2Config)(**fields)


def load_engine(
    model: str | None, config: str | None, device: torch.device, dtype: torch.dtype
) -> HogwildEngine:
    """An engine over `config`'s random weights, else over `model` (None: the embedded default).

    End-of-sequence tokens are ignored, so every worker and every baseline decodes the same number of
    tokens."""
    if config is not None:
        torch.manual_seed(0)
        with torch.device(device):
            loaded = AutoModelForCausalLM.from_config(config_for(config), dtype=dtype)
        engine = HogwildEngine(loaded.eval(), CountingTokenizer())
    else:
        engine = HogwildEngine.from_pretrained(model, device=device, dtype=dtype)
    engine.eos_token_ids = frozenset()
    return engine


def prompt_ids(engine: HogwildEngine, length: int, vocabulary: bool) -> list[int]:
    """`length` prompt ids: repeated English text (real tokenizers) or a repeated id pattern."""
    if vocabulary:
        unit = engine.encode(PROMPT_TEXT)
    else:
        generator = torch.Generator().manual_seed(0)
        vocab = engine.model.config.get_text_config().vocab_size
        unit = torch.randint(3, vocab, (97,), generator=generator).tolist()
    return (unit * (length // len(unit) + 1))[:length]
