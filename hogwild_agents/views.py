"""A worker's view: which blocks it attends to, in which order, at which offsets.

`worker_view` is a pure function of the layout, the worker and the lengths of the run's blocks, so it
can be tested against views written out by hand, and the generation loop, the attention plan and the
reference checks all use the same one. Header blocks are numbered: 0 is the header before the others'
work in progress, 1..n are each worker's own header, n+1..2n the separator placed before worker i's
step when it follows another worker's step (combined layout).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from hogwild_agents.cache import HEADERS, SHARED, STEPS

Layout = Literal["contiguous", "interleaved", "combined"]
LAYOUTS: tuple[Layout, ...] = ("contiguous", "interleaved", "combined")


@dataclass(frozen=True)
class Segment:
    """A block in a row's view: `visible` tokens of block (group, slot), placed at view `offset`."""

    group: int
    slot: int
    offset: int
    visible: int


def others_header_slot() -> int:
    return 0


def own_header_slot(worker: int) -> int:
    return 1 + worker


def separator_slot(worker: int, n_workers: int) -> int:
    return 1 + n_workers + worker


def n_header_slots(n_workers: int) -> int:
    return 2 * n_workers + 1


def worker_view(
    layout: Layout, worker: int, n_workers: int, length: Callable[[int, int], int]
) -> list[Segment]:
    """The worker's view as blocks in view order, its own step block last (even when empty).

    `length(group, slot)` gives a block's current length. Empty blocks are left out, except the
    worker's own step block, which its next tokens are written into.
    - contiguous: [shared, other workers' blocks..., own block]
    - interleaved: [shared, own header, own step]
    - combined: [shared, others header, others' steps (separated)..., own header, own step]
    """
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
    segments = [Segment(SHARED, 0, 0, length(SHARED, 0))]
    offset = segments[0].visible

    def add(group: int, slot: int) -> None:
        nonlocal offset
        visible = length(group, slot)
        if visible or (group == STEPS and slot == worker):
            segments.append(Segment(group, slot, offset, visible))
            offset += visible

    if layout == "combined":
        add(HEADERS, others_header_slot())
    if layout in ("combined", "contiguous"):
        first = True
        for other in range(n_workers):
            if other != worker and length(STEPS, other):
                if not first:
                    add(HEADERS, separator_slot(other, n_workers))
                add(STEPS, other)
                first = False
    if layout in ("combined", "interleaved"):
        add(HEADERS, own_header_slot(worker))
    add(STEPS, worker)
    return segments


def view_length(segments: Sequence[Segment]) -> int:
    return sum(s.visible for s in segments)
