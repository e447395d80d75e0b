"""The shared-cache engine against plain transformers.

One worker must be ordinary generation. With several workers, each worker's logits must equal the
model's own attention over that worker's view (its cached blocks materialised as an ordinary cache at
their view positions), in every layout, after forced and sampled steps, injections and history moves.
"""

from __future__ import annotations

import pytest
import torch

from hogwild_agents import LAYOUTS, HogwildEngine
from hogwild_agents.reference import from_scratch_logits, view_kv_logits
from tests.conftest import TINY_CONFIGS, named_script

PROMPT = (
    "<|im_start|>user\nList three prime numbers and explain why they are prime.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# 16-bit runs are compared with the model's own 16-bit attention over the same view. On these tiny
# random models (logit scale ~8) 16-bit rounding alone moves every path's logits by up to ~6% of the
# scale away from fp32, while the fast path and the model's own 16-bit attention stay within ~3% of
# each other (CPU and H100); the bound is 5% of the logit scale.
HALF_PRECISION_REL = 5e-2


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    scale = max(1.0, expected.abs().max().item())
    diff = (actual - expected).abs().max().item()
    assert diff <= rel * scale, f"max abs diff {diff:.3g} exceeds {rel} x logit scale {scale:.3g}"


def hf_greedy(engine: HogwildEngine, prompt: str, n: int) -> list[int]:
    ids = torch.tensor([engine.encode(prompt)])
    with torch.inference_mode():
        out = engine.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    new = out[0, ids.shape[1] :].tolist()
    return [t for t in new if t not in engine.eos_token_ids]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_worker_reproduces_generate_on_embedded_model(smol_engine, layout):
    prompt = smol_engine.chat_prompt("Write two short paragraphs about the sea.")
    expected = hf_greedy(smol_engine, prompt, 40)
    result = smol_engine.generate(prompt, n_workers=1, layout=layout, max_new_tokens=40)
    assert result.workers[0].token_ids == expected
    assert result.workers[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("name", TINY_CONFIGS)
@pytest.mark.parametrize("attention", ["fast", "eager"])
def test_one_worker_reproduces_generate_on_tiny_models(tiny_engines, name, attention):
    engine = tiny_engines[name]
    expected = hf_greedy(engine, PROMPT, 24)
    result = engine.generate(PROMPT, n_workers=1, layout="combined", max_new_tokens=24, attention=attention)
    assert result.workers[0].token_ids == expected


def test_one_worker_with_history_moves_equals_from_scratch(tiny_engines):
    """Steps forced to end (paragraph breaks) move into history; the view stays the plain sequence."""
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=1, layout="combined", max_new_tokens=64, temperature=1.0, seed=3)
    for step in range(30):
        if step % 7 == 3:
            run.force(0, "\n\n")
        expected = from_scratch_logits(run, 0) if run.workers[0].pending else None
        record = run.step()
        if expected is not None:
            assert_logits_close(record.logits[0], expected)
    assert run.cache.shared_length > run.prompt_tokens  # steps really moved into the shared history


def test_sampling_with_a_seed_is_reproducible(smol_engine):
    options = dict(n_workers=3, max_new_tokens=20, temperature=0.9, top_p=0.95, top_k=50)
    first = smol_engine.generate("Tell me a story.", seed=7, **options)
    second = smol_engine.generate("Tell me a story.", seed=7, **options)
    other = smol_engine.generate("Tell me a story.", seed=8, **options)
    assert [w.token_ids for w in first.workers] == [w.token_ids for w in second.workers]
    assert [w.token_ids for w in first.workers] != [w.token_ids for w in other.workers]


def drive_and_check(run, steps: int, *, force_every: int = 5, inject_at: int = 6) -> int:
    """Step a run, checking every fed worker against the materialised-view reference. Returns checks."""
    checks = 0
    run.record_views = True
    for step in range(steps):
        if run.done:
            break
        for w in run.workers:
            if not w.finished and (step + w.index) % force_every == 2:
                run.force(w.index, "\n\n" if w.index % 2 == 0 else " forced words")
        if step == inject_at:
            run.inject("\n\n[note] an injected block everyone sees.\n\n")
        expected = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
        views = {i: run.view_token_ids(i) for i in expected}
        record = run.step()
        for worker, reference in expected.items():
            assert record.views[worker] == views[worker]
            assert record.view_lengths[worker] == len(views[worker])
            if worker in record.logits:
                assert_logits_close(record.logits[worker], reference)
                checks += 1
    return checks


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n_workers", [2, 3, 4])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_every_worker_matches_its_materialised_view(tiny_engines, layout, n_workers, name):
    engine = tiny_engines[name]
    script = named_script(PROMPT, n_workers)
    run = engine.start(
        PROMPT,
        n_workers=n_workers,
        layout=layout,
        protocol=script,
        max_new_tokens=40,
        temperature=1.0,
        seed=n_workers,
    )
    checks = drive_and_check(run, 16)
    assert checks >= 12 * n_workers
    if layout != "contiguous":
        assert run.cache.shared_length > run.prompt_tokens  # finished steps moved into history


@pytest.mark.parametrize("name", ["qwen2", "llama-yarn"])
def test_other_architectures_match_their_views(tiny_engines, name):
    engine = tiny_engines[name]
    run = engine.start(
        PROMPT, n_workers=3, protocol=named_script(PROMPT, 3), max_new_tokens=30, temperature=1.0, seed=1
    )
    assert drive_and_check(run, 12) >= 30


def test_embedded_model_workers_match_their_views(smol_engine):
    run = smol_engine.start(
        PROMPT,
        n_workers=3,
        layout="combined",
        protocol=named_script(PROMPT, 3),
        max_new_tokens=30,
        temperature=0.8,
        seed=5,
    )
    assert drive_and_check(run, 10) >= 24


def step_side_by_side(runs: list, steps: int, *, inject_at: int, force_every: int) -> None:
    """Step runs that differ only in their attention implementation, with the same injections and
    forced paragraph breaks; they must choose the same tokens with logits equal within fp32 rounding."""
    for step in range(steps):
        if step == inject_at:
            for run in runs:
                run.inject("A shared note.\n\n")
        if step % force_every == 1:
            for run in runs:
                run.force(step % len(run.workers), "\n\n")
        first, *others = (run.step() for run in runs)
        for other in others:
            assert other.chosen == first.chosen
            for worker, logits in other.logits.items():
                assert_logits_close(logits, first.logits[worker], rel=2e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fast_path_equals_eager_reference(tiny_engines, layout):
    engine = tiny_engines["qwen3"]
    runs = [
        engine.start(
            PROMPT,
            n_workers=4,
            layout=layout,
            protocol=named_script(PROMPT, 4),
            max_new_tokens=30,
            attention=attention,
        )
        for attention in ("fast", "eager")
    ]
    step_side_by_side(runs, 20, inject_at=5, force_every=6)


@pytest.mark.parametrize("layout", ["contiguous", "interleaved"])
def test_first_step_equals_from_scratch_for_every_worker(tiny_engines, layout):
    """Before anyone has written, each view is the prompt, its own header and step header, each computed
    right after the prompt: from-scratch logits are exact. (In the combined layout the own header was
    computed without the others' header before it, so only the materialised-view reference applies.)"""
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=4, layout=layout, protocol=named_script(PROMPT, 4))
    expected = {w: from_scratch_logits(run, w) for w in range(4)}
    record = run.step()
    for worker, reference in expected.items():
        assert_logits_close(record.logits[worker], reference)


def test_contiguous_workers_see_each_others_tokens_at_once(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(
        PROMPT, n_workers=2, layout="contiguous", protocol=named_script(PROMPT, 2), max_new_tokens=10
    )
    run.step()
    run.step()
    alice_stream = run.workers[0].stream
    bob_view = run.view_token_ids(1)
    written = [t for t in alice_stream if t not in run.workers[0].pending]
    start = len(engine.encode(PROMPT))
    assert bob_view[start : start + len(written)] == written


def test_interleaved_hides_steps_in_progress(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(
        PROMPT, n_workers=2, layout="interleaved", protocol=named_script(PROMPT, 2), max_new_tokens=20
    )
    for _ in range(3):
        run.step()
    alice_block = run.cache.token_ids(2, 0)
    assert alice_block  # Alice has a step in progress, and Bob does not see it:
    own_header = engine.encode(run.script.own_header(1))
    bob_rest = own_header + run.cache.token_ids(2, 1) + run.workers[1].pending
    assert run.view_token_ids(1) == run.cache.token_ids(0) + bob_rest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attention", ["fast", "eager"])
def test_half_precision_tracks_the_reference(tokenizer, dtype, attention):
    """In 16-bit both paths stay within rounding distance of the model's own attention (also 16-bit)."""
    from tests.conftest import build_tiny_engine

    engine = build_tiny_engine("llama", tokenizer, dtype=dtype)
    run = engine.start(
        PROMPT, n_workers=3, protocol=named_script(PROMPT, 3), max_new_tokens=12, attention=attention
    )
    for _ in range(8):
        expected = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
        record = run.step()
        for worker, reference in expected.items():
            assert record.logits[worker].dtype == torch.float32
            assert torch.isfinite(record.logits[worker]).all()
            assert_logits_close(record.logits[worker], reference, rel=HALF_PRECISION_REL)


def test_sixteen_workers(tiny_engines):
    engine = tiny_engines["qwen2"]
    result = engine.generate(PROMPT, n_workers=16, max_new_tokens=6, temperature=1.0, seed=0)
    assert len(result.workers) == 16
    assert all(w.generated_tokens == 6 or w.finish_reason == "stop" for w in result.workers)
