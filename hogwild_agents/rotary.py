"""Pure RoPE rotations by position differences, one description per layer, as the model applies them.

Keys are stored rotated at their local index inside a block. A query rotated at view position p
attends a key at local index j of a block placed at offset o via <R(p) q, R(o + j) k> = <R(p - o) q, R(j) k>,
so the engine rotates the query by -o once per (query, block). That holds for any rotation by fixed
frequencies, whatever dims it acts on and however it pairs them; a `RotarySpec` says which:

- `inv_freq`: the frequency of each rotated pair (zeros allowed: those pairs never turn);
- `start`: the first rotated dim (0, or `head_dim - rot_dim` when the rotated part comes last, as in
  multi-head latent attention);
- `interleaved`: pairs are (2i, 2i+1) (GLM, complex-number RoPE) rather than (i, i + rot_dim/2).

A model's `Rotations` holds one spec per layer (None: the layer has no positions, NoPE), read from the
model itself by `hogwild_agents.architecture`. These rotations never include the model's attention
scaling (YaRN's factor is applied once, by the model itself, when it rotates at view positions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hogwild_agents.errors import UnsupportedModelError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved counterpart of rotate_half."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


@dataclass(frozen=True, eq=False)
class RotarySpec:
    """How one layer rotates queries and keys of `head_dim` dims by position (see the module docstring)."""

    inv_freq: torch.Tensor  # [rot_dim / 2] float64, on the CPU
    start: int
    interleaved: bool
    head_dim: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.start + self.rot_dim > self.head_dim:
            raise UnsupportedModelError(
                f"rotary dims {self.start}..{self.start + self.rot_dim} do not fit a head of {self.head_dim}"
            )
        # equal for specs that rotate alike (layers sharing one set of cos/sin tables); computed here,
        # outside any compiled graph
        key = (self.start, self.interleaved, self.head_dim, tuple(self.inv_freq.tolist()))
        object.__setattr__(self, "key", key)

    key: tuple = field(init=False, repr=False, compare=False)

    @property
    def rot_dim(self) -> int:
        return 2 * self.inv_freq.numel()

    def cos_sin(self, deltas: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of shape [*deltas.shape, rot_dim] for integer `deltas` (angles in float64)."""
        angles = deltas.to(torch.float64)[..., None] * self.inv_freq.to(deltas.device)
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate the last dim of `x` ([..., head_dim]) by the angles of `cos`/`sin` ([..., rot_dim])."""
        turn = rotate_pairs if self.interleaved else rotate_half
        if self.rot_dim == x.shape[-1]:
            return x * cos + turn(x) * sin
        end = self.start + self.rot_dim
        rotated = x[..., self.start : end]
        rotated = rotated * cos + turn(rotated) * sin
        return torch.cat((x[..., : self.start], rotated, x[..., end:]), dim=-1)

    def shift(self, x: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """`x` rotated by `delta` positions (one delta for all of it), computed in fp32, in x's dtype."""
        delta = torch.as_tensor(delta, device=x.device)
        cos, sin = self.cos_sin(delta, torch.float32)
        return self.rotate(x.float(), cos, sin).to(x.dtype)


class Rotations:
    """The rotary spec of every layer (None for a layer without positions)."""

    def __init__(self, layers: Sequence[RotarySpec | None]) -> None:
        if not any(spec is not None for spec in layers):
            raise UnsupportedModelError(
                "no layer of this model rotates queries and keys by position (RoPE); hogwild_agents needs "
                "RoPE to place shared cache blocks at different positions per worker."
            )
        # layers rotating alike share one spec object (and so one set of cos/sin tables per forward)
        shared: dict[tuple, RotarySpec] = {}
        self.layers: tuple[RotarySpec | None, ...] = tuple(
            None if spec is None else shared.setdefault(spec.key, spec) for spec in layers
        )

    @classmethod
    def uniform(
        cls,
        inv_freq: torch.Tensor,
        head_dim: int,
        n_layers: int,
        *,
        start: int = 0,
        interleaved: bool = False,
    ) -> Rotations:
        """Every layer rotating the same way (a plain RoPE model; also handy in tests and benchmarks)."""
        freq = inv_freq.detach().to("cpu", torch.float64)
        return cls([RotarySpec(freq, start, interleaved, head_dim)] * n_layers)

    @property
    def specs(self) -> list[RotarySpec]:
        """The distinct specs, in layer order."""
        seen: dict[int, RotarySpec] = {}
        for spec in self.layers:
            if spec is not None:
                seen.setdefault(id(spec), spec)
        return list(seen.values())

    def __len__(self) -> int:
        return len(self.layers)

    def layer(self, index: int) -> RotarySpec | None:
        return self.layers[index]

    def shift_layer(self, layer: int, x: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """Keys of one layer ([..., head_dim]) rotated by `delta` positions (unchanged for a NoPE layer)."""
        spec = self.layers[layer]
        return x if spec is None else spec.shift(x, delta)

    def shift_all(self, x: torch.Tensor, delta: int | torch.Tensor) -> torch.Tensor:
        """Keys of every layer ([layers, ..., head_dim]) rotated by `delta`, each layer by its own spec."""
        if isinstance(delta, int) and delta == 0:
            return x
        out = x.clone()
        for spec in self.specs:
            index = [i for i, s in enumerate(self.layers) if s is spec]
            out[index] = spec.shift(x[index], delta)
        return out
