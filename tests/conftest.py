"""Shared fixtures: the embedded default model and tiny random-weight models built from configs."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # run the Triton kernel in Triton's CPU interpreter (set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

from hogwild_agents import HogwildEngine, RunScript
from hogwild_agents.loading import load_model_and_tokenizer

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    vocab_size=49152,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, rope_theta=10000.0),
    "qwen2": lambda: Qwen2Config(**TINY, rope_theta=10000.0),
    "qwen3": lambda: Qwen3Config(**TINY, head_dim=16, rope_theta=10000.0),
    "llama-yarn": lambda: LlamaConfig(
        **TINY,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ),
}


@pytest.fixture(scope="session")
def smol_parts():
    """The embedded SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer."""
    return load_model_and_tokenizer(None, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def smol_engine(smol_parts) -> HogwildEngine:
    return HogwildEngine(*smol_parts)


@pytest.fixture(scope="session")
def tokenizer(request):
    """The embedded model's tokenizer (or the one in $HOGWILD_TEST_TOKENIZER, for machines without it)."""
    if path := os.environ.get("HOGWILD_TEST_TOKENIZER"):
        return AutoTokenizer.from_pretrained(path)
    return request.getfixturevalue("smol_parts")[1]


def build_tiny_engine(
    name: str, tokenizer, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> HogwildEngine:
    torch.manual_seed(0)
    config = TINY_CONFIGS[name]()
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    # larger random weights give peaked, well-separated logits (no near-ties for greedy comparisons)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return HogwildEngine(model.eval(), tokenizer)


@pytest.fixture(scope="session")
def tiny_engines(tokenizer) -> dict[str, HogwildEngine]:
    return {name: build_tiny_engine(name, tokenizer) for name in TINY_CONFIGS}


NAMES = ("Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi")


def named_script(prompt: str, n_workers: int) -> RunScript:
    """A small protocol-like script with names, section headers and step headers."""
    names = NAMES[:n_workers]
    return RunScript(
        prompt=prompt,
        worker_names=names,
        others_header="\n\n# Others at work\n",
        own_headers=tuple(f"\n\n# {name} (you) now\n" for name in names),
        step_header=lambda worker, step: f"**{names[worker]} [{step}]:** ",
    )
