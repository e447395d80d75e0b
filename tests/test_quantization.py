"""Quantized weights: a model loaded with a transformers quantization config runs unchanged, exactly
(against the same quantized model's own generate and attention over each view), or is refused.

torchao's int8 weight-only scheme runs on the CPU here; its int4 weight-only kernels need CUDA (or the
mslk package) in torchao 0.18, so int4, bitsandbytes 4-bit, AWQ/GPTQ and FP8 run in tests/test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TorchAoConfig

from hogwild_agents import HogwildEngine, UnsupportedModelError
from hogwild_agents.quantization import check_quantization
from tests.conftest import named_script
from tests.model_families import FAMILIES_BY_NAME
from tests.test_equivalence import drive_and_check, hf_greedy
from tests.test_model_families import PROMPT, build_model

torchao = pytest.importorskip("torchao.quantization")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random-weight Llama and a tiny sliding-window Mistral saved as checkpoints."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name in ("llama", "mistral"):
        build_model(FAMILIES_BY_NAME[name]).save_pretrained(root / name)
    return root


def load(checkpoint, name: str, quant_type) -> torch.nn.Module:
    config = TorchAoConfig(quant_type)
    return AutoModelForCausalLM.from_pretrained(
        checkpoint / name, quantization_config=config, dtype=torch.float32
    )


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_int8_weight_only_is_exact(checkpoint, tokenizer, name):
    model = load(checkpoint, name, torchao.Int8WeightOnlyConfig())
    assert type(model.model.layers[0].self_attn.q_proj.weight).__name__ == "Int8Tensor"  # really quantized
    engine = HogwildEngine(model.eval(), tokenizer)
    expected = hf_greedy(engine, PROMPT, 10)
    assert engine.generate(PROMPT, n_workers=1, max_new_tokens=10).workers[0].token_ids == expected
    for layout in ("contiguous", "combined"):
        run = engine.start(
            PROMPT, n_workers=3, layout=layout, protocol=named_script(PROMPT, 3), max_new_tokens=30, seed=1
        )
        assert drive_and_check(run, 8) >= 18


def test_activation_quantization_is_refused_at_construction(checkpoint, tokenizer):
    model = load(checkpoint, "llama", torchao.Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(UnsupportedModelError, match=r"quantizes activations per forward.*weight-only"):
        HogwildEngine(model.eval(), tokenizer)


def test_bitsandbytes_8bit_is_refused_and_4bit_accepted():
    """Checked on the config alone (bitsandbytes needs CUDA to load weights)."""
    model = build_model(FAMILIES_BY_NAME["llama"])
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True)
    with pytest.raises(UnsupportedModelError, match=r"LLM\.int8"):
        check_quantization(model)
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
    check_quantization(model)
    model.config.quantization_config = BitsAndBytesConfig(load_in_4bit=True)
    check_quantization(model)
    model.config.quantization_config = BitsAndBytesConfig(load_in_8bit=True).to_dict()  # as saved
    with pytest.raises(UnsupportedModelError, match=r"LLM\.int8"):
        check_quantization(model)
