"""The Triton block-attention kernel against the fast path and the materialised-view reference.

On CUDA the compiled kernel runs; elsewhere conftest sets TRITON_INTERPRET=1 and Triton's interpreter
runs the same kernel on the CPU. Small chunks force long blocks to split across programs, so the
log-sum-exp merge of partial results is exercised on short prompts too.
"""

from __future__ import annotations

import os

import pytest
import torch

from hogwild_agents import LAYOUTS, HogwildEngine
from hogwild_agents.cache import STEPS
from hogwild_agents.plan import ForwardPlan, RowPlan
from tests.conftest import named_script
from tests.test_equivalence import PROMPT, drive_and_check, hf_greedy, step_side_by_side

triton_attention = pytest.importorskip("hogwild_agents.triton_attention")

# one family per attention feature: soft-capping with sliding windows, sinks with sliding windows,
# multi-head latent attention (K and V head dims differ, decoupled rotary part), interleaved partial
# rotary, chunked attention with NoPE layers
FEATURE_FAMILIES = ["gemma2", "gpt-oss", "deepseek-v2", "glm", "llama4-text"]


def test_one_worker_reproduces_generate(tiny_engines):
    engine = tiny_engines["llama"]
    expected = hf_greedy(engine, PROMPT, 10)
    result = engine.generate(PROMPT, n_workers=1, max_new_tokens=10, attention="triton")
    assert result.workers[0].token_ids == expected


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_worker_matches_its_materialised_view(tiny_engines, layout):
    engine = tiny_engines["qwen3"]
    run = engine.start(
        PROMPT,
        n_workers=2,
        layout=layout,
        protocol=named_script(PROMPT, 2),
        max_new_tokens=20,
        temperature=1.0,
        seed=3,
        attention="triton",
    )
    assert drive_and_check(run, 6, force_every=4, inject_at=3) >= 8


def test_triton_equals_fast_path_step_by_step(tiny_engines, monkeypatch):
    """Same choices and logits within fp32 rounding, through forced tokens, injections and moves; with
    chunks of one page or more long blocks are split across programs."""
    monkeypatch.setattr(triton_attention, "MIN_CHUNK", 16)
    engine = tiny_engines["llama-yarn"]
    runs = [
        engine.start(
            PROMPT,
            n_workers=3,
            protocol=named_script(PROMPT, 3),
            max_new_tokens=16,
            temperature=1.0,
            seed=11,
            attention=attention,
        )
        for attention in ("fast", "triton")
    ]
    step_side_by_side(runs, 6, inject_at=3, force_every=4)


@pytest.mark.parametrize("name", FEATURE_FAMILIES)
def test_model_families_match_their_views(tokenizer, name, monkeypatch):
    """Windows, soft-caps, sinks, K/V of different head dims, interleaved and partial rotary, chunks and
    NoPE layers on the kernel: every worker's logits equal the model's attention over its view, after
    forced tokens, a tool result, an injection and history moves."""
    from tests.model_families import FAMILIES_BY_NAME
    from tests.test_model_families import build_model, drive, start

    monkeypatch.setattr(triton_attention, "MIN_CHUNK", 32)  # split the shared block: the merge runs
    engine = HogwildEngine(build_model(FAMILIES_BY_NAME[name]), tokenizer)
    calls = []
    kernel = triton_attention.triton_attention
    monkeypatch.setattr(triton_attention, "triton_attention", lambda *a: calls.append(1) or kernel(*a))
    assert drive(start(engine, "combined", "triton"), 8) >= 16
    assert calls  # the decode forwards went through the kernel


def test_items_read_every_block_once_split_into_chunks(tiny_engines, monkeypatch):
    engine = tiny_engines["llama"]
    run = engine.start("word " * 600, n_workers=3, max_new_tokens=4)
    run.step()
    for w in run.workers:
        run.cache.reserve(STEPS, w.index, len(w.pending))
    rows = [RowPlan(tuple(w.pending), tuple(run.view(w.index)), run.cache) for w in run.workers]
    plan = ForwardPlan(rows, run.pool)
    longest = max(read.width for read in plan.reads)
    assert triton_attention.chunk_length(plan) == triton_attention.MIN_CHUNK  # ~600 keys: 3 chunks
    monkeypatch.setattr(triton_attention, "MIN_CHUNK", 16)
    chunk = triton_attention.chunk_length(plan)
    assert chunk % 16 == 0 and chunk >= -(-longest // triton_attention.SPLITS)
    table = triton_attention.ReadTable.from_plan(plan)
    items = table.items.tolist()
    shared = run.cache.shared_length  # the shared block: one read, all three workers' queries stacked
    shared_items = [i for i in items if i[4] - i[3] > 0 and i[1] == 3 and i[4] <= shared]
    assert sum(end - start for *_, start, end in shared_items) == shared
    assert max(end - start for *_, start, end in shared_items) == chunk
    assert table.pages_read == plan.read_pages()[1]  # each page of every view read once
    assert table.merge_table.shape[0] == plan.n_tokens


def test_fits_sends_prefill_sized_forwards_to_the_fast_path(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=2, max_new_tokens=2)
    rows = [RowPlan(tuple(range(3, 3 + 100)), tuple(run.view(0)), run.cache)]
    run.cache.reserve(STEPS, 0, 100)
    plan = ForwardPlan(rows, run.pool)
    heads = engine.attention.layers[0].heads
    query = torch.zeros(1, heads, plan.n_tokens, 16)
    assert not triton_attention.fits(plan, query)  # 100 queries x 2 heads per kv head > MAX_QUERIES


def test_triton_off_cuda_without_the_interpreter_is_refused(tiny_engines, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the engine is on the CPU only on machines without CUDA")
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention='fast'"):
        tiny_engines["llama"].start(PROMPT, n_workers=2, attention="triton")
