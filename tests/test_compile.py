"""The static decode step and `compile=True`: the same tokens and logits as the eager fast path, fixed
shapes with nothing read back to the host inside the forward, and one compilation per bucket used.

Compiling on a CPU is slow (inductor writes and builds C++ per graph), so the compiled checks run on one
tiny model, with a page bucket large enough that 200 steps use two buckets.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from hogwild_agents import LAYOUTS, HogwildEngine
from hogwild_agents.cache import PAGE_SIZE
from hogwild_agents.static_step import LONG_TILE, StaticDecodeStep, bucket, decode_tables, round_up, tiles_of
from tests.conftest import named_script
from tests.test_equivalence import PROMPT, assert_logits_close, step_side_by_side


def static_engine(engine: HogwildEngine, **step_options) -> HogwildEngine:
    """An engine over the same model whose decode forwards run the static step (eagerly by default)."""
    other = HogwildEngine(engine.model, engine.tokenizer)
    other.decode_step = StaticDecodeStep(engine.model, **step_options)
    return other


def test_rows_are_bucketed_to_powers_of_two_and_tiles_to_multiples():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 5, 17)] == [1, 1, 2, 4, 4, 8, 32]
    assert bucket(3, minimum=8) == 8
    assert [round_up(n, 4) for n in (0, 1, 4, 5, 9)] == [0, 4, 4, 8, 12]


def test_tiles_read_each_block_once(tiny_engines):
    """Every page of every block a decode forward reads is in exactly one tile, with every row that sees
    the block as a slot; long tiles hold LONG_TILE pages of one block."""
    engine = tiny_engines["llama"]
    long_prompt = PROMPT * 20  # 400 tokens: a long tile and single pages
    run = engine.start(long_prompt, n_workers=3, layout="contiguous", protocol=named_script(long_prompt, 3))
    seen = {}

    def forward(plan, attend):
        seen["tiles"] = tiles_of(plan)
        seen["plan"] = plan
        return plain(plan, attend)

    for _ in range(3):
        run.step()
    engine.forward, plain = forward, engine.forward
    try:
        run.step()
    finally:
        engine.forward = plain
    tiles, plan = seen["tiles"], seen["plan"]
    pages = [p for t in tiles for p in t[0]]
    assert len(pages) == len(set(pages)) == plan.read_pages()[1]
    assert any(len(t[0]) == LONG_TILE for t in tiles)  # the long prompt
    shared = [t for t in tiles if t[0][0] == run.cache.block(0).pages[0]]
    assert len(shared) == 1 and [s[0] for s in shared[0][2]] == [0, 1, 2]  # read once, by all three rows


@pytest.mark.parametrize("layout", LAYOUTS)
def test_static_step_equals_the_fast_path(tiny_engines, layout):
    """3 workers: one padding row; forced breaks move steps into history, an inject joins the prompt."""
    fast = tiny_engines["qwen3"]
    static = static_engine(fast)
    options = dict(n_workers=3, layout=layout, protocol=named_script(PROMPT, 3), max_new_tokens=30)
    runs = [engine.start(PROMPT, **options) for engine in (fast, static)]
    step_side_by_side(runs, 20, inject_at=5, force_every=6)
    assert {shape.rows for shape, _ in static.decode_step.buckets_used} == {4}


def test_static_step_serves_many_runs_in_one_forward(tiny_engines):
    """Runs submitted together share each decode forward; their tokens do not change."""
    fast = tiny_engines["llama-yarn"]
    static = static_engine(fast)
    prompts = [PROMPT, PROMPT + " Be brief.", "Count to ten."]
    options = dict(n_workers=2, max_new_tokens=10, temperature=1.0, seed=4)
    expected = fast.generate_many(prompts, **options)
    results = static.generate_many(prompts, **options)
    for want, got in zip(expected, results, strict=True):
        assert [w.token_ids for w in got.workers] == [w.token_ids for w in want.workers]
    assert any(shape.rows >= 4 for shape, _ in static.decode_step.buckets_used)  # rows of several runs


class OpRecorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_the_static_forward_is_the_same_ops_for_a_bucket_and_never_reads_values_back(tiny_engines):
    """Fixed shapes and no host syncs: every forward of one bucket dispatches the same operator sequence,
    and none reads a tensor value back (`.item()`, `.tolist()`: aten._local_scalar_dense)."""
    engine = tiny_engines["qwen2"]
    step = StaticDecodeStep(engine.model)
    sequences: dict[tuple, Counter] = {}
    run = engine.start(PROMPT, n_workers=2, protocol=named_script(PROMPT, 2), max_new_tokens=20)
    run.step()  # the step headers (several tokens per row)
    for index in range(10):
        if index == 4:
            run.force(0, "\n\n")  # a history move, and a multi-token row at the next step
        pending = [w for w in run.workers if w.pending]
        if any(len(w.pending) != 1 for w in pending):
            run.step()
            continue
        plan_seen = {}

        def forward(plan, attend, plan_seen=plan_seen):
            recorder = OpRecorder()
            with recorder:
                logits = step(plan)
            plan_seen["ops"] = recorder.ops
            plan_seen["key"] = decode_tables(plan, plan.pool.scratch_page()).shape
            return logits

        engine.forward, plain = forward, engine.forward
        try:
            run.step()
        finally:
            engine.forward = plain
        ops = plan_seen["ops"]
        assert not any("_local_scalar_dense" in op for op in ops)
        sequences.setdefault(plan_seen["key"], Counter())[tuple(ops)] += 1
    assert sum(sum(c.values()) for c in sequences.values()) >= 6
    assert all(len(c) == 1 for c in sequences.values()), "a bucket dispatched different operators"


def test_padding_rows_write_only_the_scratch_page(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=3, protocol=named_script(PROMPT, 3), max_new_tokens=8)
    pool = run.pool
    scratch = pool.scratch_page()
    step = StaticDecodeStep(engine.model)
    seen = {}

    def forward(plan, attend):
        seen["owned"] = {p for blocks in run.cache.blocks for b in blocks for p in b.pages}
        before = (pool.k.clone(), pool.v.clone())
        logits = step(plan)
        changed = ((pool.k != before[0]) | (pool.v != before[1])).any(dim=(0, 1, 3, 4))
        seen["changed"] = set(changed.nonzero().flatten().tolist())
        return logits

    for _ in range(3):
        run.step()
    engine.forward, plain = forward, engine.forward
    try:
        run.step()  # 3 rows padded to 4
    finally:
        engine.forward = plain
    assert scratch not in seen["owned"]
    assert scratch in seen["changed"]  # the padding row wrote its key there
    assert seen["changed"] <= seen["owned"] | {scratch}


def test_a_compiled_pool_grows_when_pages_are_reserved(tiny_engines):
    engine = HogwildEngine(tiny_engines["llama"].model, tiny_engines["llama"].tokenizer, compile=True)
    pool = engine.new_pool()
    assert pool.n_pages >= 1 and pool.pages_in_use == 1  # the scratch page
    pool.reserve(40)
    assert pool.n_pages >= 41
    grown = pool.n_pages
    pages = pool.allocate(40)
    assert pool.n_pages == grown  # taking reserved pages does not change the storage
    pool.release(pages)
    pool.unreserve(40)
    assert pool.n_pages == grown  # nor does giving them back (the scratch page keeps it)


@pytest.fixture
def one_thread():
    """Compiled CPU kernels run OpenMP loops over torch's threads; on a shared 2-core machine one
    thread avoids spinning threads waiting for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_compiled_step_equals_eager_over_200_steps(tiny_engines, one_thread, monkeypatch):
    """`compile=True` against the eager fast path: 200 steps with history moves (forced paragraph
    breaks), forced text and injected blocks. Same choices, logits within 1e-4 of the logit scale; no
    graph break; one compilation per (rows, pages, pool size) bucket used, never a recompilation."""
    eager = tiny_engines["qwen3"]
    compiled = HogwildEngine(eager.model, eager.tokenizer, compile=True)
    backend = CompileCounterWithBackend("inductor")
    compiled.decode_step = StaticDecodeStep(eager.model, compile=True, backend=backend)
    for engine in (eager, compiled):  # every worker decodes all 200 steps (the shared engine restored after)
        monkeypatch.setattr(engine, "eos_token_ids", frozenset())
    options = dict(n_workers=3, protocol=named_script(PROMPT, 3), max_new_tokens=240)
    runs = [engine.start(PROMPT, **options) for engine in (eager, compiled)]
    breaks_before = sum(counters["graph_break"].values())
    decode_steps = 0
    for step in range(200):
        if step % 50 == 25:
            for run in runs:
                run.inject("A note for everyone.\n\n")
        if step % 9 == 4:
            for run in runs:
                run.force(step % 3, "\n\n" if step % 2 else " forced words")
        decode_steps += all(len(w.pending) <= 1 for w in runs[0].workers)
        first, second = (run.step() for run in runs)
        assert second.chosen == first.chosen, f"step {step}"
        for worker, logits in first.logits.items():
            assert_logits_close(second.logits[worker], logits)
    buckets = compiled.decode_step.buckets_used
    assert decode_steps >= 150
    assert runs[1].cache.shared_length > runs[1].prompt_tokens  # steps moved into the history
    assert sum(counters["graph_break"].values()) == breaks_before
    assert len({shape for shape, _ in buckets}) >= 4  # tile counts changed as the views grew
    assert backend.frame_count <= 3  # tile counts are symbolic: no compilation per count
    assert max(len(run.view_token_ids(0)) for run in runs) > 32 * PAGE_SIZE
