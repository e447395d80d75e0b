"""Pure RoPE rotations by position differences, taken from the model's own rotary embedding.

Keys are stored rotated at their local index inside a block. A query rotated at view position p
attends a key at local index j of a block placed at offset o via <R(p) q, R(o + j) k> = <R(p - o) q, R(j) k>,
so the engine rotates the query by -o once per (worker, block). These rotations use the model's inverse
frequencies but never its attention scaling (YaRN's factor is applied once, by the model itself).
"""

from __future__ import annotations

import torch
from torch import nn

from hogwild_agents.errors import UnsupportedModelError


def find_rotary_embedding(model: nn.Module) -> nn.Module:
    """Return the model's rotary embedding module (the one holding `inv_freq`)."""
    for name in ("model.rotary_emb", "model.language_model.rotary_emb", "rotary_emb"):
        module = model
        for part in name.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if module is not None and hasattr(module, "inv_freq"):
            return module
    for module in model.modules():
        if hasattr(module, "inv_freq") and "rotary" in type(module).__name__.lower():
            return module
    raise UnsupportedModelError(
        f"{type(model).__name__} has no rotary embedding module with `inv_freq`; only RoPE models "
        "(Llama, Qwen2, Qwen3, Mistral, ...) are supported."
    )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Rotations:
    """cos/sin tables for rotating vectors by integer position differences."""

    def __init__(self, inv_freq: torch.Tensor, head_dim: int) -> None:
        self.inv_freq = inv_freq.detach().to(torch.float64)  # [rot_dim / 2]
        self.rot_dim = 2 * inv_freq.numel()
        if self.rot_dim > head_dim:
            raise UnsupportedModelError(f"rotary dim {self.rot_dim} exceeds head dim {head_dim}")
        self.head_dim = head_dim

    @classmethod
    def from_model(cls, model: nn.Module) -> Rotations:
        config = model.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(find_rotary_embedding(model).inv_freq, head_dim)

    def cos_sin(self, deltas: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [*deltas.shape, rot_dim] for integer `deltas` (computed in float64)."""
        angles = deltas.to(torch.float64)[..., None] * self.inv_freq.to(deltas.device)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the last dim of `x` (only its first rot_dim entries when RoPE is partial)."""
        if self.rot_dim == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        rotated, passed = x[..., : self.rot_dim], x[..., self.rot_dim :]
        return torch.cat((rotated * cos + rotate_half(rotated) * sin, passed), dim=-1)
