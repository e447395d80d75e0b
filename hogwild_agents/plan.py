"""One forward pass, planned: the rows of one run or of many, packed into one token sequence.

Each row is one writer (a worker, or a run's prompt/header/injected text): tokens written at the end of
the last block of its view. The rows of every run in the forward are packed into one sequence
`[1, tokens]` (no padding), so a prompt chunk of one run and the single decode tokens of others go
through the model's weights together. The plan turns the rows into the tensors the attention needs,
once per forward and shared by all layers; it is built from plain Python lists, so its cost does not
grow with the context length.

For the batched attention (`attention.fast_attention`), rows are grouped into *batches*: every run whose
rows each feed one token shares one batch; a run feeding several tokens in a row gets a batch of its
own. In a batch the keys of each block group sit side by side on one key axis: per run, the blocks of
the group its rows see, each padded to the same number of pages. The batch's `bias` masks that axis per
(run, row, query): 0 where the key is in the row's view (and causally before the query), a large
negative number elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from hogwild_agents.cache import GROUPS, PAGE_SIZE, SHARED, KVPool, RunCache, pages_for
from hogwild_agents.views import Segment

MASKED = torch.finfo(torch.float32).min


@dataclass(frozen=True)
class RowPlan:
    """A row of one forward: tokens written at the end of the view's last segment, in `cache`'s blocks."""

    token_ids: tuple[int, ...]
    segments: tuple[Segment, ...]
    cache: RunCache

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
class GroupKeys:
    """One block group's part of a batch's key axis: `blocks` blocks per run, each `pages` pages wide."""

    group: int
    blocks: int
    pages: int
    page_table: torch.Tensor  # [runs, blocks, pages] pool page of each key page
    cos: torch.Tensor | None  # [runs, blocks, rows, rot]: query rotation by -offset (None: SHARED)
    sin: torch.Tensor | None
    first_page: int | None = None  # set when the table is one run of consecutive pages (read in place)

    @property
    def used(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def width(self) -> int:
        return self.blocks * self.used


@dataclass
class AttentionBatch:
    """Runs attended together: `runs` x `rows` x `q_len` query slots (left-padded rows)."""

    rows_of_runs: list[list[int]]  # forward row indices of each run
    runs: int
    rows: int
    q_len: int
    query_index: torch.Tensor  # [runs * rows * q_len] packed token of each query slot (0 for padding)
    valid: torch.Tensor  # [runs * rows * q_len] bool: the slot holds a real token
    tokens: torch.Tensor  # [valid slots] packed token of each valid slot, in slot order
    groups: list[GroupKeys]
    bias: torch.Tensor  # [runs, rows, q_len, keys]


class ForwardPlan:
    """Tensors for one forward pass over a KV pool."""

    def __init__(self, rows: list[RowPlan], pool: KVPool) -> None:
        if not rows or any(not r.token_ids for r in rows):
            raise ValueError("every row of a forward must feed at least one token")
        self.rows = rows
        self.pool = pool
        self.rotations = pool.rotations
        self.derived: dict[str, Any] = {}  # tables an attention builds on the first layer, reused by the rest
        device = pool.shape.device
        self.device = device
        self.row_starts = [0]
        for row in rows:
            self.row_starts.append(self.row_starts[-1] + len(row.token_ids))
        self.n_tokens = self.row_starts[-1]

        ids, positions, pages, offsets, unrotate = [], [], [], [], []
        for row in rows:
            n, first = len(row.token_ids), row.first_position
            ids.extend(row.token_ids)
            positions.extend(range(first, first + n))
            block = row.cache.block(row.target.group, row.target.slot)
            row_pages, row_offsets = block.locations(row.target.visible, n)
            pages.extend(row_pages)
            offsets.extend(row_offsets)
            unrotate.extend([-row.target.offset] * n)
        self._lists = (ids, positions, pages, offsets, unrotate)

    # the tensors are built on first use: a static decode step (static_step.py) packs its own
    @cached_property
    def input_ids(self) -> torch.Tensor:  # [1, tokens]
        return torch.tensor([self._lists[0]], dtype=torch.long, device=self.device)

    @cached_property
    def position_ids(self) -> torch.Tensor:  # [1, tokens]
        return torch.tensor([self._lists[1]], dtype=torch.long, device=self.device)

    @cached_property
    def last_index(self) -> torch.Tensor:  # [rows] packed index of each row's last token
        return torch.tensor([s - 1 for s in self.row_starts[1:]], device=self.device)

    @cached_property
    def write_pages(self) -> torch.Tensor:  # [tokens]
        return torch.tensor(self._lists[2], dtype=torch.long, device=self.device)

    @cached_property
    def write_offsets(self) -> torch.Tensor:  # [tokens]
        return torch.tensor(self._lists[3], dtype=torch.long, device=self.device)

    @cached_property
    def _unrotation(self) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
        """New keys arrive rotated at view positions; blocks store them at local positions: cos/sin
        [tokens, rot] of -offset of each token's block (None, None: every offset is 0)."""
        unrotate = self._lists[4]
        if not any(unrotate):
            return None, None
        return self.rotations.cos_sin(torch.tensor(unrotate, device=self.device), torch.float32)

    @property
    def unrotate_cos(self) -> torch.Tensor | None:
        return self._unrotation[0]

    @property
    def unrotate_sin(self) -> torch.Tensor | None:
        return self._unrotation[1]

    @property
    def single_tokens(self) -> bool:
        """Every row feeds exactly one token (a decode forward)."""
        return self.n_tokens == len(self.rows)

    @property
    def view_lengths(self) -> list[int]:
        return [row.view_length for row in self.rows]

    def row_tokens(self, row: int) -> range:
        """Packed token indices of row `row`."""
        return range(self.row_starts[row], self.row_starts[row + 1])

    @cached_property
    def batches(self) -> list[AttentionBatch]:
        """The rows grouped for batched attention (see the module docstring)."""
        by_run: dict[int, list[int]] = {}
        for n, row in enumerate(self.rows):
            by_run.setdefault(id(row.cache), []).append(n)
        decode = [rows for rows in by_run.values() if all(len(self.rows[n].token_ids) == 1 for n in rows)]
        others = [rows for rows in by_run.values() if rows not in decode]
        return [self._batch(group) for group in ([decode] if decode else []) + [[rows] for rows in others]]

    def _batch(self, runs: list[list[int]]) -> AttentionBatch:
        k = len(runs)
        rows = max(len(r) for r in runs)
        q_len = max(len(self.rows[n].token_ids) for r in runs for n in r)
        query_index = [0] * (k * rows * q_len)
        valid = [False] * (k * rows * q_len)
        tokens = []
        pads = [[q_len] * rows for _ in range(k)]
        for b, run_rows in enumerate(runs):
            for r, n in enumerate(run_rows):
                span = self.row_tokens(n)
                pads[b][r] = q_len - len(span)
                for t, token in enumerate(span):
                    slot = (b * rows + r) * q_len + pads[b][r] + t
                    query_index[slot], valid[slot] = token, True
        for slot, ok in enumerate(valid):
            if ok:
                tokens.append(query_index[slot])

        # per group: the blocks each run's rows see, in slot order
        groups: list[GroupKeys] = []
        limits_base: list[list[list[int]]] = [[[] for _ in range(rows)] for _ in range(k)]  # [b][r][block]
        target_block = [[-1] * rows for _ in range(k)]
        for g in GROUPS:
            slots = [sorted({s.slot for n in r for s in self.rows[n].segments if s.group == g}) for r in runs]
            n_blocks = max(len(s) for s in slots)
            if n_blocks == 0:
                continue
            first_block = len(limits_base[0][0])
            needed = [[0] * n_blocks for _ in range(k)]
            offsets = [[[0] * rows for _ in range(n_blocks)] for _ in range(k)]
            for b, run_rows in enumerate(runs):
                for r in range(rows):
                    limits_base[b][r].extend([0] * n_blocks)
                for r, n in enumerate(run_rows):
                    row = self.rows[n]
                    for seg in row.segments:
                        if seg.group != g:
                            continue
                        j = slots[b].index(seg.slot)
                        new = len(row.token_ids) if seg is row.target else 0
                        needed[b][j] = max(needed[b][j], seg.visible + new)
                        offsets[b][j][r] = seg.offset
                        limits_base[b][r][first_block + j] = seg.visible
                        if seg is row.target:
                            target_block[b][r] = first_block + j
            n_pages = max(1, max(pages_for(x) for per_run in needed for x in per_run))
            table = []
            for b in range(k):
                run_cache = self.rows[runs[b][0]].cache
                per_block = []
                for j in range(n_blocks):
                    pages = []
                    if j < len(slots[b]):
                        pages = run_cache.block(g, slots[b][j]).pages[: pages_for(needed[b][j])]
                    per_block.append(pages + [0] * (n_pages - len(pages)))
                table.append(per_block)
            cos = sin = None
            if g != SHARED:
                deltas = -torch.tensor(offsets, device=self.device)  # [k, blocks, rows]
                cos, sin = self.rotations.cos_sin(deltas, torch.float32)
            flat = [page for per_run in table for per_block in per_run for page in per_block]
            consecutive = flat == list(range(flat[0], flat[0] + len(flat)))
            page_table = torch.tensor(table, dtype=torch.long, device=self.device)
            groups.append(
                GroupKeys(g, n_blocks, n_pages, page_table, cos, sin, flat[0] if consecutive else None)
            )

        # limits[b, r, t, block]: keys of `block` visible to query t of row r of run b
        base = torch.tensor(limits_base, dtype=torch.long)  # [k, rows, blocks]
        n_blocks_total = base.shape[-1]
        pad = torch.tensor(pads, dtype=torch.long)  # [k, rows]
        grow = (torch.arange(q_len)[None, None] - pad[..., None] + 1).clamp_min(0)  # [k, rows, q_len]
        target = torch.tensor(target_block, dtype=torch.long)
        onehot = torch.zeros(k, rows, n_blocks_total + 1, dtype=torch.long)
        onehot.scatter_(2, torch.where(target < 0, n_blocks_total, target)[..., None], 1)
        limits = base[:, :, None] + grow[..., None] * onehot[:, :, None, :n_blocks_total]
        widths = [gk.used for gk in groups for _ in range(gk.blocks)]
        local = torch.cat([torch.arange(w) for w in widths])  # [keys] index inside its block
        block_of = torch.repeat_interleave(torch.arange(len(widths)), torch.tensor(widths))
        visible = local < limits[..., block_of]  # [k, rows, q_len, keys]
        bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, MASKED)
        return AttentionBatch(
            rows_of_runs=runs,
            runs=k,
            rows=rows,
            q_len=q_len,
            query_index=torch.tensor(query_index, dtype=torch.long, device=self.device),
            valid=torch.tensor(valid, device=self.device),
            tokens=torch.tensor(tokens, dtype=torch.long, device=self.device),
            groups=groups,
            bias=bias.to(self.device),
        )
