"""A worker's view, checked against views written out by hand.

`worker_view` is checked on block lengths alone; then a run driven with forced text is checked token by
token: the expected view of each layout is assembled here from the texts the workers were made to
write, independently of the engine's own view function.
"""

from __future__ import annotations

import pytest

from hogwild_agents.cache import HEADERS, SHARED, STEPS
from hogwild_agents.views import LAYOUTS, Segment, worker_view
from tests.conftest import named_script
from tests.test_equivalence import PROMPT

# 3 workers: shared 100 tokens; headers: others 5, own 4 each, separators 2 each; steps 10, 0, 7
LENGTHS = {(SHARED, 0): 100, (HEADERS, 0): 5, (STEPS, 0): 10, (STEPS, 1): 0, (STEPS, 2): 7}
LENGTHS |= {(HEADERS, 1 + w): 4 for w in range(3)} | {(HEADERS, 4 + w): 2 for w in range(3)}


def length(group: int, slot: int) -> int:
    return LENGTHS[(group, slot)]


def no_separators(group: int, slot: int) -> int:  # the contiguous and interleaved layouts have none
    return 0 if group == HEADERS and slot >= 4 else length(group, slot)


S = Segment
EXPECTED = {
    ("combined", 0): [S(0, 0, 0, 100), S(1, 0, 100, 5), S(2, 2, 105, 7), S(1, 1, 112, 4), S(2, 0, 116, 10)],
    ("combined", 1): [
        S(0, 0, 0, 100),
        S(1, 0, 100, 5),
        S(2, 0, 105, 10),
        S(1, 6, 115, 2),  # the separator before worker 2's step, which follows worker 0's
        S(2, 2, 117, 7),
        S(1, 2, 124, 4),
        S(2, 1, 128, 0),  # its own (empty) step block, where its next tokens go
    ],
    ("combined", 2): [S(0, 0, 0, 100), S(1, 0, 100, 5), S(2, 0, 105, 10), S(1, 3, 115, 4), S(2, 2, 119, 7)],
    ("interleaved", 0): [S(0, 0, 0, 100), S(1, 1, 100, 4), S(2, 0, 104, 10)],
    ("interleaved", 1): [S(0, 0, 0, 100), S(1, 2, 100, 4), S(2, 1, 104, 0)],
    ("interleaved", 2): [S(0, 0, 0, 100), S(1, 3, 100, 4), S(2, 2, 104, 7)],
    ("contiguous", 0): [S(0, 0, 0, 100), S(2, 2, 100, 7), S(2, 0, 107, 10)],
    ("contiguous", 1): [S(0, 0, 0, 100), S(2, 0, 100, 10), S(2, 2, 110, 7), S(2, 1, 117, 0)],
    ("contiguous", 2): [S(0, 0, 0, 100), S(2, 0, 100, 10), S(2, 2, 110, 7)],
}


@pytest.mark.parametrize(("layout", "worker"), sorted(EXPECTED))
def test_views_from_block_lengths(layout, worker):
    lengths = length if layout == "combined" else no_separators
    assert worker_view(layout, worker, 3, lengths) == EXPECTED[(layout, worker)]


def test_view_of_a_single_worker_is_the_plain_sequence():
    for layout in LAYOUTS:
        view = worker_view(layout, 0, 1, lambda g, s: {(SHARED, 0): 9, (STEPS, 0): 3}.get((g, s), 0))
        assert view == [S(0, 0, 0, 9), S(2, 0, 9, 3)]


def test_unknown_layout_is_refused():
    with pytest.raises(ValueError, match="layout"):
        worker_view("spiral", 0, 2, length)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_views_of_a_run_equal_the_views_written_by_hand(tiny_engines, layout):
    """Alice is made to finish a step; each view is rebuilt from the workers' streams in the layout's
    order (history, section headers, others' steps, own step) and compared token by token."""
    engine = tiny_engines["llama"]
    script = named_script(PROMPT, 2)
    run = engine.start(PROMPT, n_workers=2, layout=layout, protocol=script, max_new_tokens=50, seed=1)
    enc = engine.encode
    first_step = enc(script.step_header(0, 1)) + enc(" Two is prime.\n\n")
    run.force(0, first_step[len(enc(script.step_header(0, 1))) :])
    for _ in range(3):  # feed the headers; feed Alice's step (it ends); feed her next step's start
        run.step()
    prompt, others = enc(PROMPT), enc(script.others_header)
    own = [enc(script.own_header(w)) for w in (0, 1)]
    pending = [run.workers[w].pending for w in (0, 1)]
    written = [run.workers[w].stream[: len(run.workers[w].stream) - len(pending[w])] for w in (0, 1)]
    assert written[0][: len(first_step)] == first_step
    alice_now = written[0][len(first_step) :]  # her second step so far (header included)
    bob = written[1]
    if layout == "contiguous":  # [prompt, other workers' blocks, own block]; no history, no headers
        expected = [prompt + bob + written[0], prompt + written[0] + bob]
    elif layout == "interleaved":  # [prompt + history, own header, own step]
        expected = [prompt + first_step + own[0] + alice_now, prompt + first_step + own[1] + bob]
    else:  # [prompt + history, others header, others' steps, own header, own step]
        expected = [
            prompt + first_step + others + bob + own[0] + alice_now,
            prompt + first_step + others + alice_now + own[1] + bob,
        ]
    for worker in (0, 1):
        assert run.view_token_ids(worker) == expected[worker] + pending[worker], (layout, worker)
