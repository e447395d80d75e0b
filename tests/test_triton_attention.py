"""The Triton block-attention kernel against the fast path and the materialised-view reference.

On CUDA the compiled kernel runs; elsewhere conftest sets TRITON_INTERPRET=1 and Triton's interpreter
runs the same kernel on the CPU. Small chunks force long blocks to split across programs, so the
log-sum-exp merge of partial results is exercised on short prompts too.
"""

from __future__ import annotations

import os

import pytest
import torch

from hogwild_agents import LAYOUTS
from hogwild_agents.cache import STEPS
from hogwild_agents.plan import ForwardPlan, RowPlan
from tests.conftest import named_script
from tests.test_equivalence import PROMPT, drive_and_check, hf_greedy, step_side_by_side

triton_attention = pytest.importorskip("hogwild_agents.triton_attention")


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
    chunks of 8 keys or more (1/SPLITS of the longest view) long blocks are split across programs."""
    monkeypatch.setattr(triton_attention, "MIN_CHUNK", 8)
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


def test_chunks_split_the_longest_view_into_about_splits_programs(tiny_engines, monkeypatch):
    engine = tiny_engines["llama"]
    run = engine.start("word " * 600, n_workers=2, max_new_tokens=4)
    run.step()
    for w in run.workers:
        run.cache.reserve(STEPS, w.index, len(w.pending))
    rows = [RowPlan(tuple(w.pending), tuple(run.view(w.index)), run.cache) for w in run.workers]
    plan = ForwardPlan(rows, run.pool)
    longest = max(row.view_length for row in rows)
    assert triton_attention.chunk_length(plan) == triton_attention.MIN_CHUNK  # ~600 keys: not split
    monkeypatch.setattr(triton_attention, "MIN_CHUNK", 16)
    chunk = triton_attention.chunk_length(plan)
    assert chunk == -(-longest // triton_attention.SPLITS)
    table = triton_attention.BlockTable.from_plan(plan)
    shared = run.cache.shared_length  # every row sees the whole shared block, the only one this long
    shared_items = [m[3] - m[2] for m in table.meta.tolist() if m[4] == shared and not m[5]]
    assert max(shared_items) == chunk and sum(shared_items) == 2 * shared


def test_merge_gives_zeros_to_queries_that_saw_nothing():
    m = torch.tensor([[[0.5, float("-inf")]], [[1.5, float("-inf")]]])  # [items, kv_heads, q]
    denominators = torch.tensor([[[2.0, 0.0]], [[1.0, 0.0]]])
    acc = torch.tensor([[[[2.0], [0.0]]], [[[3.0], [0.0]]]])  # [items, kv_heads, q, dim]
    out = triton_attention.merge_partials(m, denominators, acc, torch.tensor([0, 0]), rows=1)
    w0, w1 = torch.exp(torch.tensor(0.5 - 1.5)), torch.tensor(1.0)
    expected = (2.0 * w0 + 3.0 * w1) / (2.0 * w0 + 1.0 * w1)
    assert torch.allclose(out[0, 0, 0, 0], expected)
    assert out[0, 0, 1, 0] == 0.0


def test_merge_kernel_equals_the_torch_merge():
    """Items of three rows in mixed order, one row's padding query seeing nothing, GQA with 2 heads per
    kv head and q_len 3: the kernel's merge equals merge_partials, written in [rows, q_len, heads, dim]."""
    torch.manual_seed(0)
    rows, kv_heads, per_kv, q_len, dim, block_q, block_d = 3, 2, 2, 3, 20, 16, 32
    item_rows = torch.tensor([2, 0, 1, 0, 2, 2, 1])
    m = torch.randn(len(item_rows), kv_heads, block_q) * 3
    m[:, :, per_kv * q_len :] = float("-inf")  # padding lanes of the query tile
    m[item_rows == 1, :, 0] = float("-inf")  # row 1's first query saw no key
    denominators = torch.rand_like(m) + 0.5
    denominators[torch.isinf(m)] = 0.0
    acc = torch.randn(len(item_rows), kv_heads, block_q, block_d)
    acc[torch.isinf(m)] = 0.0
    expected = triton_attention.merge_partials(m, denominators, acc, item_rows, rows)
    expected = expected[:, :, : per_kv * q_len, :dim].reshape(rows, kv_heads, per_kv, q_len, dim)
    expected = expected.permute(0, 3, 1, 2, 4).reshape(rows, q_len, kv_heads * per_kv, dim)

    row_items = torch.argsort(item_rows, stable=True).to(torch.int32)
    row_starts = torch.tensor([0, 2, 4, 7], dtype=torch.int32)
    out = torch.empty(rows, q_len, kv_heads * per_kv, dim)
    triton_attention.merge_rows(m, denominators, acc, row_items, row_starts, out)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (out[1, 0, ::per_kv] == 0).all()  # query 0 of every kv head's first head


def test_triton_off_cuda_without_the_interpreter_is_refused(tiny_engines, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the engine is on the CPU only on machines without CUDA")
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="attention='fast'"):
        tiny_engines["llama"].start(PROMPT, n_workers=2, attention="triton")
