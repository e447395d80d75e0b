"""What the engine must know about a model's attention, read from the model itself, layer by layer.

A shared, position-shifted cache is exact for a model when every layer's attention is softmax attention
whose only dependence on positions is (a) a rotation of queries and keys by fixed frequencies (RoPE, or
none at all), and (b) a mask the engine can rebuild over view positions (causal, sliding window,
chunked). `inspect_model` establishes that for a loaded model, or refuses it with an
`UnsupportedModelError` naming the reason:

1. `check_config` (also run before weights load): refusals a config alone decides — no RoPE anywhere
   (learned absolute positions, ALiBi), RoPE whose frequencies depend on the sequence length (dynamic
   NTK), layers that are not attention (recurrent, linear attention), keys and values shared across
   layers, query scales that depend on the token's index in the forward.
2. A probe forward through transformers' attention registry: every layer must call the registered
   attention function (a layer with its own attention code would silently ignore the shared cache), with
   only keyword arguments whose meaning the engine honours (`scaling`, `sliding_window`, `softcap`,
   `s_aux` sinks, ...).
   The same forward lets the model build its own attention masks (transformers' mask functions), and
   each layer's mask function is evaluated far into the context: it must be causal, a sliding window
   or a chunk of positions, which the engine then rebuilds over view positions.
3. A second probe forward where each attention module receives the SAME hidden state at every position
   (positions far apart): whatever still differs between positions in the queries and keys is what the
   model does with positions. Per layer it must be nothing (a NoPE layer) or one rotation matching the
   model's own inverse frequencies, in one of the pairings and dim ranges models use (`RotarySpec`);
   values must not depend on positions at all.

The result, `ModelAttention`, gives the engine each layer's rotation, window and K/V shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import causal_mask_function

from hogwild_agents.errors import UnsupportedModelError
from hogwild_agents.quantization import check_quantization
from hogwild_agents.rotary import RotarySpec, Rotations

# RoPE variants whose frequencies are fixed (pure rotations compose: R(a)R(b) = R(a+b)); "longrope" is
# fixed below its original context, which caps the context (see `context_limit`).
COMPOSABLE_ROPE = ("default", "linear", "llama3", "yarn", "proportional", "longrope")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# keyword arguments an attention module may pass that carry nothing the engine must honour
NEUTRAL_KWARGS = frozenset(
    {
        "dropout",
        "position_ids",
        "cache_position",
        "output_attentions",
        "output_router_logits",
        "use_cache",
        "layer_idx",
        "is_causal",
    }
)
HONOURED_KWARGS = frozenset({"scaling", "sliding_window", "softcap", "s_aux"})
PROBE_POSITIONS = (0, 1, 2, 3, 5, 8, 13, 64, 257, 1000, 2049, 4097)


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention, as the probe saw it."""

    index: int
    rotary: RotarySpec | None  # None: the layer has no positions (NoPE)
    heads: int
    kv_heads: int
    k_dim: int
    v_dim: int
    sliding_window: int | None = None  # keys with q_pos - k_pos < window are seen (transformers' rule)
    chunk_size: int | None = None  # keys in the query's chunk of view positions are seen (Llama 4)
    softcap: float | None = None
    sinks: bool = False

    @property
    def features(self) -> list[str]:
        """What this layer's attention adds to plain causal softmax (for the model support table)."""
        found = []
        if self.rotary is None:
            found.append("NoPE")
        else:
            if self.rotary.rot_dim < self.k_dim:
                found.append("partial rotary" + (" (last dims)" if self.rotary.start else ""))
            if self.rotary.interleaved:
                found.append("interleaved rotary")
        if self.sliding_window is not None:
            found.append("sliding window")
        if self.chunk_size is not None:
            found.append("chunked attention")
        if self.softcap is not None:
            found.append("logit soft-capping")
        if self.sinks:
            found.append("attention sinks")
        if self.k_dim != self.v_dim:
            found.append("K/V head dims differ")
        return found


@dataclass(frozen=True)
class ModelAttention:
    """Every layer's attention, and the context the engine may use (see `context_limit`)."""

    layers: tuple[LayerAttention, ...]
    max_positions: int
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        shapes = {(layer.kv_heads, layer.k_dim, layer.v_dim) for layer in self.layers}
        if len(shapes) > 1:
            raise UnsupportedModelError(
                f"the layers keep keys and values of different shapes ({sorted(shapes)} as (kv heads, key "
                "dim, value dim)); hogwild_agents' cache holds one shape for every layer."
            )

    @cached_property
    def rotations(self) -> Rotations:
        return Rotations([layer.rotary for layer in self.layers])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def kv_heads(self) -> int:
        return self.layers[0].kv_heads

    @property
    def k_dim(self) -> int:
        return self.layers[0].k_dim

    @property
    def v_dim(self) -> int:
        return self.layers[0].v_dim

    @property
    def features(self) -> list[str]:
        """What the layers add to plain causal RoPE attention, each once, in order of first appearance."""
        seen: dict[str, None] = {}
        if len(self.rotations.specs) > 1:
            seen["per-layer RoPE"] = None
        for layer in self.layers:
            for feature in layer.features:
                seen.setdefault(feature)
        return list(seen)

    @classmethod
    def plain(cls, rotations: Rotations, heads: int, kv_heads: int, head_dim: int, max_positions: int):
        """Plain causal RoPE attention in every layer (tests and benchmarks that build a pool by hand)."""
        layers = tuple(
            LayerAttention(i, spec, heads, kv_heads, head_dim, head_dim)
            for i, spec in enumerate(rotations.layers)
        )
        return cls(layers, max_positions)


# ---- the config --------------------------------------------------------------------------------------
def text_config(config: Any) -> Any:
    return getattr(config, "get_text_config", lambda: config)()


def rope_parameters(config: Any) -> list[dict[str, Any]]:
    """The RoPE parameter sets of a config (one, or one per layer type), [] when it has no RoPE fields."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(params, dict) and any(isinstance(v, dict) for v in params.values()):
        return [v for v in params.values() if isinstance(v, dict)]
    if isinstance(params, dict):
        return [params]
    return [{"rope_type": "default"}] if getattr(config, "rope_theta", None) is not None else []


def check_config(config: Any) -> None:
    """Refuse what the config alone shows the engine cannot run exactly (before any weights load)."""
    config = text_config(config)
    name = type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{name} is an encoder-decoder model; hogwild_agents runs decoder-only LMs."
        )
    if getattr(config, "alibi", False):
        raise UnsupportedModelError(
            f"{name} uses ALiBi position biases, not rotary embeddings; hogwild_agents needs RoPE to place "
            "shared cache blocks at different positions per worker."
        )
    params = rope_parameters(config)
    if not params and getattr(config, "rotary_dim", None):
        raise UnsupportedModelError(
            f"{name} rotates by a precomputed table of sines and cosines (`rotary_dim`) and names no RoPE "
            "parameters, so the engine cannot re-rotate cached keys exactly; use a model whose config has "
            "`rope_parameters` (Llama, Qwen, Mistral, Gemma, Phi-3...)."
        )
    if not params:
        raise UnsupportedModelError(
            f"{name} has no rotary position embeddings (RoPE); hogwild_agents needs RoPE to place shared "
            "cache blocks at different positions per worker. Use a RoPE model such as Llama, Qwen, Mistral, "
            "Gemma or Phi-3."
        )
    for p in params:
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type not in COMPOSABLE_ROPE:
            raise UnsupportedModelError(
                f"RoPE type {rope_type!r} is not supported: its frequencies depend on the sequence length, "
                "so rotations by position differences do not compose. Supported types: "
                f"{', '.join(COMPOSABLE_ROPE)}."
            )
    layer_types = getattr(config, "layer_types", None) or ()
    other = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
    if other:
        raise UnsupportedModelError(
            f"{name} has layers of type {', '.join(map(repr, other))}, which keep state of their own "
            "outside the attention KV cache; hogwild_agents shares only attention caches between workers."
        )
    if getattr(config, "num_kv_shared_layers", 0):
        raise UnsupportedModelError(
            f"{name} shares keys and values across layers (num_kv_shared_layers="
            f"{config.num_kv_shared_layers}); hogwild_agents keeps one cache per layer."
        )
    if getattr(config, "attn_temperature_tuning", False) and getattr(config, "no_rope_layers", None):
        raise UnsupportedModelError(
            f"{name} scales the queries of its NoPE layers by the token's index in the forward pass "
            "(attn_temperature_tuning), which differs from its view position in a shared cache; set "
            "config.attn_temperature_tuning = False to run it (a change of the model's behaviour)."
        )


def context_limit(config: Any) -> tuple[int, tuple[str, ...]]:
    """The longest view the engine may build, and notes on why it is below the model's own context."""
    config = text_config(config)
    limit = getattr(config, "max_position_embeddings", None) or 2**31
    notes: list[str] = []
    for p in rope_parameters(config):
        if p.get("rope_type", p.get("type")) == "longrope":
            original = p.get("original_max_position_embeddings") or getattr(
                config, "original_max_position_embeddings", None
            )
            if original and original < limit:
                limit = original
                notes.append(
                    f"LongRoPE switches to its long-context frequencies beyond {original} positions; views "
                    f"are capped at {original} tokens so that every key keeps the frequencies it was "
                    "written with."
                )
    return limit, tuple(notes)


def layer_masks(config: Any, n_layers: int) -> list[tuple[int | None, int | None]]:
    """(sliding window, chunk size) of each layer from the config's layer types."""
    config = text_config(config)
    types = list(getattr(config, "layer_types", None) or ())
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if not types:
        return [(None, None)] * n_layers
    return [
        (window if t == "sliding_attention" else None, chunk if t == "chunked_attention" else None)
        for t in types[:n_layers]
    ]


# ---- the probe ---------------------------------------------------------------------------------------
@dataclass
class ProbeCall:
    module: nn.Module
    query: torch.Tensor  # [heads, tokens, q_dim] fp32
    key: torch.Tensor  # [kv_heads, tokens, k_dim]
    value: torch.Tensor  # [kv_heads, tokens, v_dim]
    kwargs: dict[str, Any]
    mask_function: Callable | None = None  # the model's mask for this layer (None: not one of transformers')


_stray_calls: list[nn.Module] | None = None  # set while probing: attention calls that got no probe
_probe_masks: dict[int, tuple[torch.Tensor, Callable]] | None = None  # set while probing: mask sentinels


def stray_call(module: nn.Module) -> None:
    """Note an attention call without the forward's keyword arguments (while a probe runs)."""
    if _stray_calls is not None:
        _stray_calls.append(module)


def mask_sentinel(mask_function: Callable) -> torch.Tensor | None:
    """While a probe runs: a stand-in for the mask the model asks for, remembering its mask function (the
    registered mask builder returns it, and the attention probe looks it up); else None."""
    if _probe_masks is None:
        return None
    sentinel = torch.zeros(1, 1, 1, 1)
    _probe_masks[id(sentinel)] = (sentinel, mask_function)
    return sentinel


class AttentionProbe:
    """Passed to the registered attention function as `hogwild_probe`: records each call, returns zeros."""

    def __init__(self) -> None:
        self.calls: list[ProbeCall] = []

    def record(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor:
        """Keep the call (and, for a mask the model built, its mask function); return zeros."""
        masks = _probe_masks or {}
        mask_function = causal_mask_function if mask is None else masks.get(id(mask), (None, None))[1]
        q, k, v = (t[0].detach().float() for t in (query, key, value))
        self.calls.append(ProbeCall(module, q, k, v, kwargs, mask_function))
        _, heads, tokens, _ = query.shape
        return value.new_zeros(1, tokens, heads, value.shape[-1])


def _forward(
    model: nn.Module, positions: list[int], probe: AttentionProbe, *, model_masks: bool
) -> list[nn.Module]:
    """Run a probe forward; return the modules that called the attention function without the probe.
    `model_masks`: the model builds its own masks (positions must then be 0, 1, 2, ...)."""
    global _stray_calls, _probe_masks
    device = next(model.parameters()).device
    ids = torch.full((1, len(positions)), _probe_token(model), dtype=torch.long, device=device)
    mask = None if model_masks else torch.zeros(1, 1, 1, 1, device=device)  # 4D: used as given
    _stray_calls = []
    _probe_masks = {} if model_masks else None
    with torch.inference_mode():
        try:
            model(
                input_ids=ids,
                position_ids=torch.tensor([positions], device=device),
                attention_mask=mask,
                use_cache=False,
                hogwild_probe=probe,
            )
        except TypeError as error:
            if "hogwild_probe" not in str(error):
                raise
            raise UnsupportedModelError(
                f"{type(model).__name__} does not pass keyword arguments through to its attention ({error}); "
                "hogwild_agents runs models built on transformers' attention interface."
            ) from error
        finally:
            stray, _stray_calls, _probe_masks = _stray_calls, None, None
    return stray


def _probe_token(model: nn.Module) -> int:
    vocab = model.get_input_embeddings().num_embeddings
    return min(100, vocab - 1)


@contextmanager
def _same_hidden_state(modules: list[nn.Module]) -> Iterator[None]:
    """Every module gets the hidden state of the forward's first position at every position."""

    def same(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            hidden = args[0]
            return (hidden[:, :1].expand_as(hidden).contiguous(), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden[:, :1].expand_as(hidden).contiguous()}

    handles = [m.register_forward_pre_hook(same, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _inv_freq_candidates(model: nn.Module) -> list[torch.Tensor]:
    """Every set of inverse frequencies the model's modules hold (buffers or attributes named *inv_freq)."""
    found: dict[tuple, torch.Tensor] = {}
    for module in model.modules():
        items = list(module.named_buffers(recurse=False)) + list(vars(module).items())
        for name, value in items:
            if "inv_freq" in name and isinstance(value, torch.Tensor) and value.dim() == 1:
                freq = value.detach().to("cpu", torch.float64)
                if freq.numel() and torch.isfinite(freq).all():
                    found.setdefault(tuple(freq.tolist()), freq)
    return list(found.values())


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-3 if dtype == torch.float32 else 4e-2


def _matches(predicted: torch.Tensor, actual: torch.Tensor, tol: float) -> bool:
    scale = actual.abs().amax().clamp_min(1e-6)
    return bool((predicted - actual).abs().amax() <= tol * scale)


def find_rotation(
    x: torch.Tensor, deltas: torch.Tensor, candidates: list[torch.Tensor], tol: float
) -> RotarySpec | bool | None:
    """The rotation relating x at each probe position to x at the first ([heads, positions, dim], all
    from the same input): None when x does not change (no positions), a spec, or False (no rotation fits)."""
    base = x[:, :1].double()
    if _matches(base.expand_as(x), x.double(), tol / 4):
        return None
    dim = x.shape[-1]
    for freq in [f for f in candidates for f in (f, -f)]:  # some models rotate the other way (NanoChat)
        rot = 2 * freq.numel()
        if rot > dim:
            continue
        for start in sorted({0, dim - rot}):
            for interleaved in (False, True):
                spec = RotarySpec(freq, start, interleaved, dim)
                cos, sin = spec.cos_sin(deltas, torch.float64)  # [positions, rot]
                if _matches(spec.rotate(base.expand_as(x), cos, sin), x.double(), tol):
                    return spec
    return False


def inspect_model(model: nn.Module) -> ModelAttention:
    """Probe a model whose attention implementation is the engine's registered function (see module
    docstring); refuse it with UnsupportedModelError when the shared cache cannot be exact for it."""
    config = text_config(model.config)
    check_config(config)
    check_quantization(model)
    max_positions, notes = context_limit(config)
    n_layers = config.num_hidden_layers
    positions = [p for p in PROBE_POSITIONS if p < max_positions]
    name = type(model).__name__

    discovery = AttentionProbe()
    stray = _forward(model, list(range(len(positions))), discovery, model_masks=True)
    if stray:
        layers = sorted({getattr(m, "layer_idx", -1) for m in stray})
        raise UnsupportedModelError(
            f"the decoder layers of {name} call their attention without the keyword arguments of the "
            f"model's forward (layers {layers[:8]}), so the shared cache's plan cannot reach the attention; "
            "hogwild_agents runs models whose layers pass them on, as transformers' current models do."
        )
    modules = _attention_modules(discovery, n_layers, name)
    probe = AttentionProbe()
    with _same_hidden_state(modules):
        _forward(model, positions, probe, model_masks=False)
    calls = {id(call.module): call for call in probe.calls}
    masks = {id(call.module): call.mask_function for call in discovery.calls}

    candidates = _inv_freq_candidates(model)
    deltas = torch.tensor(positions, dtype=torch.float64) - positions[0]
    tol = _tolerance(next(model.parameters()).dtype)
    configured = layer_masks(config, n_layers)
    layers = []
    for index, module in enumerate(modules):
        call = calls[id(module)]
        rotary = _layer_rotation(call, deltas, candidates, tol, index, name)
        window, chunk = _layer_window(call, masks[id(module)], configured[index], max_positions, index, name)
        softcap = call.kwargs.get("softcap")
        sinks = call.kwargs.get("s_aux") is not None
        if getattr(module, "sinks", None) is not None and not sinks:
            raise UnsupportedModelError(
                f"layer {index} of {name} has attention sinks that it does not pass to the attention "
                "function (as s_aux); hogwild_agents cannot honour them."
            )
        layers.append(
            LayerAttention(
                index,
                rotary,
                heads=call.query.shape[0],
                kv_heads=call.key.shape[0],
                k_dim=call.key.shape[-1],
                v_dim=call.value.shape[-1],
                sliding_window=window,
                chunk_size=chunk,
                softcap=float(softcap) if softcap else None,
                sinks=sinks,
            )
        )
    attention = ModelAttention(tuple(layers), max_positions, notes)
    attention.rotations  # noqa: B018  refuses a model with no rotation in any layer
    return attention


def _attention_modules(discovery: AttentionProbe, n_layers: int, name: str) -> list[nn.Module]:
    """The attention modules in layer order; every layer must have called the attention function once."""
    by_layer: dict[int, nn.Module] = {}
    for call in discovery.calls:
        index = getattr(call.module, "layer_idx", None)
        if index is None or index in by_layer:
            raise UnsupportedModelError(
                f"{name}'s attention modules do not each have their own layer index (`layer_idx`); "
                "hogwild_agents keeps one cache per layer and cannot tell its layers apart."
            )
        unknown = sorted(
            k
            for k, v in call.kwargs.items()
            if v is not None and k not in NEUTRAL_KWARGS | HONOURED_KWARGS and not k.startswith("hogwild_")
        )
        if unknown:
            raise UnsupportedModelError(
                f"layer {index} of {name} passes {', '.join(unknown)} to its attention function; "
                "hogwild_agents does not know how to honour that exactly."
            )
        if call.kwargs.get("is_causal") is False:
            raise UnsupportedModelError(f"layer {index} of {name} attends bidirectionally; it is not causal.")
        by_layer[index] = call.module
    missing = [i for i in range(n_layers) if i not in by_layer]
    if missing:
        raise UnsupportedModelError(
            f"layers {missing[:8]} of {name} do not go through transformers' attention interface (their "
            "own attention code, or no attention at all), so they would ignore the shared cache."
        )
    return [by_layer[i] for i in range(n_layers)]


def _layer_rotation(
    call: ProbeCall, deltas: torch.Tensor, candidates: list[torch.Tensor], tol: float, index: int, name: str
) -> RotarySpec | None:
    if not _matches(call.value[:, :1].expand_as(call.value), call.value, tol / 4):
        raise UnsupportedModelError(f"layer {index} of {name} makes its values depend on positions.")
    q_rot = find_rotation(call.query, deltas, candidates, tol)
    k_rot = find_rotation(call.key, deltas, candidates, tol)
    if q_rot is False or k_rot is False:
        raise UnsupportedModelError(
            f"layer {index} of {name} changes its {'queries' if q_rot is False else 'keys'} with position in "
            "a way that is not a rotation by the model's own RoPE frequencies (for example a position-"
            "dependent scale), so cached keys cannot be moved to other positions."
        )
    if (q_rot is None) != (k_rot is None) or (q_rot is not None and q_rot.key != k_rot.key):
        raise UnsupportedModelError(f"layer {index} of {name} rotates its queries and keys differently.")
    return q_rot


def _layer_window(
    call: ProbeCall,
    mask_function: Callable | None,
    configured: tuple[int | None, int | None],
    max_positions: int,
    index: int,
    name: str,
) -> tuple[int | None, int | None]:
    """The layer's (sliding window, chunk), from the mask the model builds for it; the window it passes
    to the attention function and its config's layer type must agree."""
    if mask_function is None:
        raise UnsupportedModelError(
            f"layer {index} of {name} gets an attention mask that transformers' mask functions did not "
            "make; hogwild_agents cannot tell which keys it lets the layer see."
        )
    window, chunk = mask_pattern(mask_function, max_positions, f"layer {index} of {name}")
    passed = call.kwargs.get("sliding_window")
    if passed is not None and passed != window:
        raise UnsupportedModelError(
            f"layer {index} of {name} passes sliding_window={passed} to its attention, but its mask "
            f"{'has no sliding window' if window is None else f'has a window of {window}'}."
        )
    if (window, chunk) != configured and configured != (None, None):
        raise UnsupportedModelError(
            f"layer {index} of {name}: its mask (window {window}, chunk {chunk}) and its config's layer type "
            f"(window {configured[0]}, chunk {configured[1]}) disagree."
        )
    return window, chunk


def _mask_queries(max_positions: int) -> list[int]:
    """Query positions to evaluate a mask at: small ones, each power of two and its neighbours, the last."""
    queries = {0, 1, 2, 3, max_positions - 1}
    power = 4
    while power < max_positions:
        queries.update((power - 1, power, power + 1))
        power *= 2
    return sorted(q for q in queries if 0 <= q < max_positions)


def mask_pattern(mask_function: Callable, max_positions: int, what: str) -> tuple[int | None, int | None]:
    """(sliding window, chunk) of a transformers mask function `(batch, head, q, kv) -> bool`: evaluated
    for queries all over the context, it must be causal, with each query seeing one run of keys ending
    at itself that starts at 0 (full), at q - window + 1 (sliding window) or at q // chunk * chunk."""
    first: dict[int, int] = {}
    zero = torch.zeros((), dtype=torch.long)
    for q in _mask_queries(max_positions):
        keys = torch.arange(q + 2)
        seen = torch.as_tensor(mask_function(zero, zero, torch.tensor(q), keys)).expand(q + 2)
        start = int(seen.float().argmax())
        if seen[q + 1] or not seen[q] or not seen[start : q + 1].all() or seen[:start].any():
            raise UnsupportedModelError(
                f"{what} masks its attention in a way that is not causal attention over one run of keys "
                "(full, sliding window or chunked); hogwild_agents cannot rebuild that mask."
            )
        first[q] = start
    late = {q: start for q, start in first.items() if start > 0}
    if not late:
        return None, None
    windows = {q - start + 1 for q, start in late.items()}
    if len(windows) == 1 and all(first[q] == max(0, q - next(iter(windows)) + 1) for q in first):
        return next(iter(windows)), None
    chunk = min(late.values())
    if all(start == q // chunk * chunk for q, start in first.items()):
        return None, chunk
    raise UnsupportedModelError(
        f"{what} masks its attention with neither a fixed sliding window nor fixed chunks; hogwild_agents "
        "cannot rebuild that mask."
    )
