"""The shared KV cache: groups of blocks in preallocated per-layer storage.

A *block* is a run of tokens whose keys are stored rotated at their local index (as if the block began
at position 0). Blocks live in *groups*; a group is one storage tensor per K and V,
`[layers, slots, kv_heads, capacity, head_dim]`, so that one batched matmul scores every block of a group.
The cache of a run has three groups:

- ``SHARED``: one block, the prompt plus the shared history (finished steps, injected blocks). It only
  grows, so its keys are stored at their absolute positions and it sits at offset 0 of every view.
- ``HEADERS``: small fixed blocks (section headers) written once at the start of a run.
- ``STEPS``: one block per worker: the worker's current step (or, in the contiguous layout, its whole
  output). A finished step moves into ``SHARED`` with one re-rotation of its keys; its slot is reused.

Each token is stored once. Storage grows by doubling when a block outgrows its capacity (one copy of
the group per doubling, never per step), so allocated bytes are at most twice the used bytes per group
plus the initial reservation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hogwild_agents.rotary import Rotations

SHARED, HEADERS, STEPS = 0, 1, 2


@dataclass
class BlockGroup:
    """Slots of equal capacity in one storage tensor per K and V."""

    k: torch.Tensor  # [layers, slots, kv_heads, capacity, head_dim]
    v: torch.Tensor  # [layers, slots, kv_heads, capacity, head_dim]
    lengths: list[int]
    token_ids: list[list[int]] = field(default_factory=list)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    def ensure_capacity(self, needed: int) -> None:
        """Grow every slot to hold at least `needed` tokens (doubling; existing entries copied once)."""
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            shape = (*old.shape[:3], new_capacity, old.shape[4])
            grown = old.new_zeros(shape)
            grown[:, :, :, : old.shape[3]] = old
            setattr(self, name, grown)


@dataclass(frozen=True)
class KVShape:
    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token over all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


class SharedKVCache:
    """All K/V of one run: the shared block, header blocks and one step block per worker."""

    def __init__(
        self,
        shape: KVShape,
        rotations: Rotations,
        n_workers: int,
        n_headers: int,
        shared_capacity: int,
        step_capacity: int = 64,
        header_capacity: int = 16,
    ) -> None:
        self.shape = shape
        self.rotations = rotations
        self.groups = [
            self._new_group(1, shared_capacity),
            self._new_group(max(n_headers, 1), header_capacity),
            self._new_group(n_workers, step_capacity),
        ]

    def _new_group(self, slots: int, capacity: int) -> BlockGroup:
        s = self.shape
        dims = (s.layers, slots, s.kv_heads, max(capacity, 1), s.head_dim)
        return BlockGroup(
            k=torch.zeros(dims, dtype=s.dtype, device=s.device),
            v=torch.zeros(dims, dtype=s.dtype, device=s.device),
            lengths=[0] * slots,
            token_ids=[[] for _ in range(slots)],
        )

    # ---- reading -------------------------------------------------------------------------------
    def length(self, group: int, slot: int = 0) -> int:
        return self.groups[group].lengths[slot]

    def token_ids(self, group: int, slot: int = 0) -> list[int]:
        return self.groups[group].token_ids[slot]

    @property
    def shared_length(self) -> int:
        return self.length(SHARED)

    @property
    def tokens_stored(self) -> int:
        return sum(sum(g.lengths) for g in self.groups)

    @property
    def bytes_used(self) -> int:
        """Bytes holding real tokens: tokens_stored x bytes_per_token."""
        return self.tokens_stored * self.shape.bytes_per_token

    @property
    def bytes_allocated(self) -> int:
        return sum(g.k.numel() * g.k.element_size() * 2 for g in self.groups)

    def block_kv(
        self, layer: int, group: int, slot: int, length: int, offset: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K rotated to absolute positions offset..offset+length and V: each [kv_heads, length, head_dim]."""
        g = self.groups[group]
        k, v = g.k[layer, slot, :, :length], g.v[layer, slot, :, :length]
        if group == SHARED or offset == 0:
            return k, v
        cos, sin = self.rotations.cos_sin(torch.tensor(offset, device=k.device), torch.float32)
        return self.rotations.rotate(k.float(), cos, sin).to(k.dtype), v

    # ---- writing -------------------------------------------------------------------------------
    def reserve(self, group: int, slot: int, n_tokens: int) -> int:
        """Make room for `n_tokens` more tokens in a block; return the local index they start at."""
        start = self.groups[group].lengths[slot]
        self.groups[group].ensure_capacity(start + n_tokens)
        return start

    def commit(self, group: int, slot: int, token_ids: list[int]) -> None:
        """Record that `token_ids` were written at the end of a block (their K/V already stored)."""
        g = self.groups[group]
        g.lengths[slot] += len(token_ids)
        g.token_ids[slot].extend(token_ids)

    def move_to_shared(self, slot: int) -> None:
        """Append a finished step block to the shared block (one re-rotation), then empty its slot."""
        steps, shared = self.groups[STEPS], self.groups[SHARED]
        length, start = steps.lengths[slot], shared.lengths[0]
        if length == 0:
            return
        shared.ensure_capacity(start + length)
        cos, sin = self.rotations.cos_sin(torch.tensor(start, device=steps.k.device), torch.float32)
        block_k = steps.k[:, slot, :, :length].float()  # [layers, kv_heads, length, head_dim]
        shared.k[:, 0, :, start : start + length] = self.rotations.rotate(block_k, cos, sin).to(
            shared.k.dtype
        )
        shared.v[:, 0, :, start : start + length] = steps.v[:, slot, :, :length]
        shared.lengths[0] += length
        shared.token_ids[0].extend(steps.token_ids[slot])
        steps.lengths[slot] = 0
        steps.token_ids[slot] = []
