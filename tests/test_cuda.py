"""The same correctness checks on a CUDA device (run where a GPU is present; CI has none)."""

from __future__ import annotations

import pytest
import torch

from hogwild_agents import LAYOUTS
from tests.conftest import build_tiny_engine, named_script
from tests.test_equivalence import HALF_PRECISION_REL, PROMPT, assert_logits_close, drive_and_check, hf_greedy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_one_worker_reproduces_generate_on_cuda(tokenizer, name):
    engine = build_tiny_engine(name, tokenizer, device="cuda")
    expected = hf_greedy(engine, PROMPT, 24)
    result = engine.generate(PROMPT, n_workers=1, max_new_tokens=24)
    assert result.workers[0].token_ids == expected


@pytest.mark.parametrize("attention", ["fast", "triton"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_workers_match_their_views_on_cuda(tokenizer, layout, attention):
    if attention == "triton":
        pytest.importorskip("triton")
    engine = build_tiny_engine("qwen3", tokenizer, device="cuda")
    run = engine.start(
        PROMPT,
        n_workers=4,
        layout=layout,
        protocol=named_script(PROMPT, 4),
        max_new_tokens=40,
        temperature=1.0,
        seed=1,
        attention=attention,
    )
    assert drive_and_check(run, 16) >= 48


@pytest.mark.parametrize("attention", ["fast", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda(tokenizer, dtype, attention):
    from hogwild_agents.reference import view_kv_logits

    engine = build_tiny_engine("llama", tokenizer, dtype=dtype, device="cuda")
    if attention == "triton":
        pytest.importorskip("triton")
    run = engine.start(
        PROMPT, n_workers=4, protocol=named_script(PROMPT, 4), max_new_tokens=20, attention=attention
    )
    for _ in range(10):
        expected = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
        record = run.step()
        for worker, reference in expected.items():
            assert_logits_close(record.logits[worker], reference, rel=HALF_PRECISION_REL)
