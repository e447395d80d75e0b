"""Which quantized models the shared cache can run exactly.

The engine packs the tokens of every worker (and of every run) into one forward, so a model is exact
only if each token's output depends on that token alone. Weight-only quantization (torchao int8/int4
weight-only, bitsandbytes 4-bit, AWQ, GPTQ) keeps that: the weights change, not how tokens mix. Schemes
that quantize activations with statistics of the whole forward do not: bitsandbytes' LLM.int8() picks
outlier feature columns from every token in the forward, and torchao's dynamic-activation configs gave
a worker logits up to 3% of the logit scale away from the same model over its view alone (tiny Llama,
fp32, CPU), so those are refused at construction.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from hogwild_agents.errors import UnsupportedModelError

ACTIVATION_MARKERS = ("DynamicActivation", "ActivationInt", "ActivationFloat")


def quantization_method(config: Any) -> str | None:
    """The quantization method a transformers quantization config names ('torchao', 'bitsandbytes'...)."""
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    if method is None:
        return None
    return str(getattr(method, "value", method))


def _torchao_type(config: Any) -> str:
    quant_type = config.get("quant_type") if isinstance(config, dict) else getattr(config, "quant_type", None)
    if isinstance(quant_type, dict):  # serialised: {"default": {"_type": "Int8WeightOnlyConfig", ...}}
        return " ".join(
            str(v.get("_type", v)) if isinstance(v, dict) else str(v) for v in quant_type.values()
        )
    return quant_type if isinstance(quant_type, str) else type(quant_type).__name__


def _field(config: Any, name: str, default: Any = None) -> Any:
    return config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)


def check_quantization(model: nn.Module) -> None:
    """Refuse a quantized model whose tokens' outputs depend on the other tokens in a forward."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return
    method = quantization_method(config)
    if method == "torchao":
        quant_type = _torchao_type(config)
        if any(marker in quant_type for marker in ACTIVATION_MARKERS):
            raise UnsupportedModelError(
                f"the model is quantized with torchao {quant_type}, which quantizes activations per "
                "forward: a worker's logits then depend on the other workers' tokens packed into the same "
                "forward, so the shared cache would not be exact. Use a weight-only config "
                "(torchao Int8WeightOnlyConfig / Int4WeightOnlyConfig), or no quantization."
            )
    outliers = _field(config, "load_in_8bit", False) and _field(config, "llm_int8_threshold", 6.0) > 0
    if method == "bitsandbytes" and outliers:
        raise UnsupportedModelError(
            "the model is loaded in bitsandbytes 8-bit (LLM.int8()), which picks outlier feature "
            "columns from every token in a forward: a worker's logits would depend on the other "
            "workers' tokens. Load it in 4-bit (load_in_4bit=True), or set llm_int8_threshold=0.0."
        )
