"""One forward pass, planned: which tokens each batch row feeds, where they go, and what each row sees.

Each row of the batch is one writer (a worker, or the prompt/header/injected text). A row's view is an
ordered list of segments (blocks at view offsets); the last segment is the block the row writes into.
The plan turns that into the tensors the attention needs, once per forward and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hogwild_agents.cache import SHARED, SharedKVCache


@dataclass(frozen=True)
class Segment:
    """A block in a row's view: `visible` tokens of block (group, slot), placed at view `offset`."""

    group: int
    slot: int
    offset: int
    visible: int


@dataclass(frozen=True)
class RowPlan:
    """A row of one forward: tokens written at the end of the view's last segment."""

    token_ids: tuple[int, ...]
    segments: tuple[Segment, ...]

    @property
    def target(self) -> Segment:
        return self.segments[-1]

    @property
    def first_position(self) -> int:
        """View position of the row's first new token."""
        return self.target.offset + self.target.visible

    @property
    def view_length(self) -> int:
        return sum(s.visible for s in self.segments) + len(self.token_ids)


@dataclass
class GroupPlan:
    """What the fast attention needs for one block group."""

    used: int  # keys scored per slot (longest block after this forward's writes)
    cos: torch.Tensor | None  # [rows, slots, rot_dim] rotation of queries by -offset (None: SHARED)
    sin: torch.Tensor | None
    visible: torch.Tensor  # bool [slots, 1, rows, 1, q_len, used]


class ForwardPlan:
    """Tensors for one forward pass over the shared cache (left-padded rows)."""

    def __init__(self, rows: list[RowPlan], cache: SharedKVCache, dtype: torch.dtype) -> None:
        if not rows or any(not r.token_ids for r in rows):
            raise ValueError("every row of a forward must feed at least one token")
        self.rows = rows
        self.cache = cache
        device = cache.shape.device
        self.q_len = max(len(r.token_ids) for r in rows)
        self.pads = [self.q_len - len(r.token_ids) for r in rows]

        input_ids = torch.zeros(len(rows), self.q_len, dtype=torch.long)
        position_ids = torch.zeros(len(rows), self.q_len, dtype=torch.long)
        for n, (row, pad) in enumerate(zip(rows, self.pads, strict=True)):
            input_ids[n, pad:] = torch.tensor(row.token_ids)
            position_ids[n, pad:] = torch.arange(row.first_position, row.first_position + len(row.token_ids))
        self.input_ids = input_ids.to(device)
        self.position_ids = position_ids.to(device)

        offsets = torch.tensor([-r.target.offset for r in rows], device=device)
        cos, sin = cache.rotations.cos_sin(offsets, torch.float32)
        self.unrotate_cos, self.unrotate_sin = cos[:, None, None], sin[:, None, None]  # [rows, 1, 1, rot]
        self.writes = self._write_indices(device)
        self.groups = [self._group_plan(g, dtype) for g in range(len(cache.groups))]

    def _write_indices(self, device: torch.device) -> dict[int, tuple[torch.Tensor, ...]]:
        """Per target group: (row, column, slot, position) index tensors of every new token."""
        by_group: dict[int, list[tuple[int, int, int, int]]] = {}
        for n, (row, pad) in enumerate(zip(self.rows, self.pads, strict=True)):
            t = row.target
            for i in range(len(row.token_ids)):
                by_group.setdefault(t.group, []).append((n, pad + i, t.slot, t.visible + i))
        return {
            g: tuple(torch.tensor(col, device=device) for col in zip(*entries, strict=True))
            for g, entries in by_group.items()
        }

    def _group_plan(self, group: int, dtype: torch.dtype) -> GroupPlan | None:
        n_slots = self.cache.groups[group].n_slots
        limits = torch.zeros(n_slots, len(self.rows), self.q_len, dtype=torch.long)  # keys visible per query
        offsets = torch.zeros(len(self.rows), n_slots, dtype=torch.long)
        for n, (row, pad) in enumerate(zip(self.rows, self.pads, strict=True)):
            for seg in row.segments:
                if seg.group != group:
                    continue
                offsets[n, seg.slot] = seg.offset
                limits[seg.slot, n, :] = seg.visible
                if seg is row.target:
                    causal = torch.arange(1, self.q_len - pad + 1)
                    limits[seg.slot, n, pad:] = seg.visible + causal
        used = int(limits.max())
        if used == 0:
            return None
        device = self.cache.shape.device
        keys = torch.arange(used)
        visible = (keys < limits[..., None])[:, None, :, None].to(device)  # [slots, 1, rows, 1, q_len, used]
        if group == SHARED:
            return GroupPlan(used, None, None, visible)
        cos, sin = self.cache.rotations.cos_sin(-offsets.to(device), torch.float32)
        return GroupPlan(used, cos, sin, visible)
