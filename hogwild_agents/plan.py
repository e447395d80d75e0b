"""One forward pass, planned: which tokens each batch row feeds, where they go, and what each row sees.

Each row of the batch is one writer (a worker, or the prompt/header/injected text). A row's view is an
ordered list of segments (blocks at view offsets); the last segment is the block the row writes into.
The plan turns that into the tensors the attention needs, once per forward and shared by all layers.
It is built from plain Python lists and turned into a handful of tensors, so its cost does not grow
with the context length.

The fast attention scores the keys of every used group side by side on one *key axis*: the SHARED
block's first `used` keys, then for each slot group `slots x used` keys (slot-major). The plan's
`bias` masks that axis per (row, query): 0 where the key is in the row's view (and causally before
the query), a large negative number elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hogwild_agents.cache import SHARED, SharedKVCache

MASKED = torch.finfo(torch.float32).min


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
    """One block group's part of the key axis."""

    group: int
    slots: int  # slots scored (SHARED: 1)
    used: int  # keys scored per slot (longest visible run after this forward's writes)
    cos: torch.Tensor | None  # [slots, 1, rows, 1, 1, rot] query rotation by -offset (None: SHARED)
    sin: torch.Tensor | None

    @property
    def width(self) -> int:
        return self.slots * self.used


class ForwardPlan:
    """Tensors for one forward pass over the shared cache (left-padded rows)."""

    def __init__(self, rows: list[RowPlan], cache: SharedKVCache, dtype: torch.dtype) -> None:
        if not rows or any(not r.token_ids for r in rows):
            raise ValueError("every row of a forward must feed at least one token")
        self.rows = rows
        self.cache = cache
        self.derived: dict[str, Any] = {}  # tables an attention builds on the first layer, reused by the rest
        device = cache.shape.device
        lengths = [len(r.token_ids) for r in rows]
        self.q_len = q_len = max(lengths)
        self.pads = [q_len - n for n in lengths]

        input_ids, position_ids = [], []
        for row, pad in zip(rows, self.pads, strict=True):
            first = row.first_position
            input_ids.append([0] * pad + list(row.token_ids))
            position_ids.append([0] * pad + list(range(first, first + len(row.token_ids))))
        self.input_ids = torch.tensor(input_ids, dtype=torch.long, device=device)  # [rows, q_len]
        self.position_ids = torch.tensor(position_ids, dtype=torch.long, device=device)  # [rows, q_len]

        # new keys arrive rotated at view positions; blocks store them at local positions
        target_offsets = [r.target.offset for r in rows]
        self.unrotate_cos: torch.Tensor | None = None  # [rows, 1, 1, rot]; None: every offset is 0
        self.unrotate_sin: torch.Tensor | None = None
        if any(target_offsets):
            offsets = torch.tensor([-o for o in target_offsets], device=device)
            cos, sin = cache.rotations.cos_sin(offsets, torch.float32)
            self.unrotate_cos, self.unrotate_sin = cos[:, None, None], sin[:, None, None]
        self.writes = self._write_indices(device)
        self.groups, self.bias = self._key_axis(device)

    def _write_indices(self, device: torch.device) -> dict[int, tuple[torch.Tensor | None, ...]]:
        """Per target group: (row, column, slot, position) index tensors of every new token. Row and
        column are None when every row feeds one token into that group (the new K/V need no gather)."""
        by_group: dict[int, list[list[int]]] = {}
        for n, (row, pad) in enumerate(zip(self.rows, self.pads, strict=True)):
            t = row.target
            columns = by_group.setdefault(t.group, [[], [], [], []])
            k = len(row.token_ids)
            columns[0].extend([n] * k)
            columns[1].extend(range(pad, pad + k))
            columns[2].extend([t.slot] * k)
            columns[3].extend(range(t.visible, t.visible + k))
        writes: dict[int, tuple[torch.Tensor | None, ...]] = {
            g: tuple(torch.tensor(col, device=device) for col in columns) for g, columns in by_group.items()
        }
        if self.q_len == 1 and len(writes) == 1:
            ((g, (_, _, slots, positions)),) = writes.items()
            writes[g] = (None, None, slots, positions)
        return writes

    def _key_axis(self, device: torch.device) -> tuple[list[GroupPlan], torch.Tensor | None]:
        """The used groups in key-axis order and the additive mask bias [rows, 1, q_len, keys] (None when
        every query sees every scored key)."""
        rows, q_len, n_groups = len(self.rows), self.q_len, len(self.cache.groups)
        # per group: row -> {slot: segment}
        seen: list[list[dict[int, Segment]]] = [[{} for _ in range(rows)] for _ in range(n_groups)]
        used = [0] * n_groups
        for n, row in enumerate(self.rows):
            new = len(row.token_ids)
            for seg in row.segments:
                seen[seg.group][n][seg.slot] = seg
                used[seg.group] = max(used[seg.group], seg.visible + (new if seg is row.target else 0))

        groups: list[GroupPlan] = []
        blocks: list[tuple[int, int]] = []  # key-axis blocks as (group, slot), each `used` keys wide
        for g in range(n_groups):
            if used[g] == 0:
                continue
            slots = 1 if g == SHARED else self.cache.groups[g].n_slots
            blocks.extend((g, s) for s in range(slots))
            if g == SHARED:
                groups.append(GroupPlan(g, 1, used[g], None, None))
                continue
            offsets = [
                [seen[g][n][s].offset if s in seen[g][n] else 0 for s in range(slots)] for n in range(rows)
            ]
            cos, sin = self.cache.rotations.cos_sin(-torch.tensor(offsets, device=device), torch.float32)
            # [rows, slots, rot] -> [slots, 1, rows, 1, 1, rot]
            cos, sin = (t.permute(1, 0, 2)[:, None, :, None, None].contiguous() for t in (cos, sin))
            groups.append(GroupPlan(g, slots, used[g], cos, sin))

        # limits[n][i][b]: keys of block b visible to query i of row n
        block_used = [used[g] for g, _ in blocks]
        limits: list[list[list[int]]] = []
        for n, (row, pad) in enumerate(zip(self.rows, self.pads, strict=True)):
            base = [seg.visible if (seg := seen[g][n].get(s)) is not None else 0 for g, s in blocks]
            t = blocks.index((row.target.group, row.target.slot))
            per_query = []
            for i in range(q_len):
                limit = list(base)
                limit[t] += max(0, i - pad + 1)
                per_query.append(limit)
            limits.append(per_query)
        if all(limit == block_used for per_query in limits for limit in per_query):
            return groups, None
        widths = torch.tensor(block_used)
        local = torch.cat([torch.arange(w) for w in widths.tolist()])  # [keys] index inside its block
        block_of = torch.repeat_interleave(torch.arange(len(blocks)), widths)  # [keys]
        visible = local < torch.tensor(limits)[..., block_of]  # [rows, q_len, keys]
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, MASKED)
        return groups, bias[:, None].to(device)
