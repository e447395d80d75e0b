"""The same correctness checks on a CUDA device (run where a GPU is present; CI has none), over the
attention implementations: fast, triton, and the compiled static decode step (CUDA graphs)."""

from __future__ import annotations

import pytest
import torch

from hogwild_agents import LAYOUTS, HogwildEngine
from hogwild_agents.reference import view_kv_logits
from tests.conftest import build_tiny_engine, named_script
from tests.test_equivalence import (
    HALF_PRECISION_REL,
    PROMPT,
    assert_logits_close,
    drive_and_check,
    hf_greedy,
    step_side_by_side,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_one_worker_reproduces_generate_on_cuda(tokenizer, name):
    engine = build_tiny_engine(name, tokenizer, device="cuda")
    expected = hf_greedy(engine, PROMPT, 24)
    result = engine.generate(PROMPT, n_workers=1, max_new_tokens=24)
    assert result.workers[0].token_ids == expected


def cuda_engine(name: str, tokenizer, attention: str, dtype: torch.dtype = torch.float32) -> HogwildEngine:
    """A tiny engine on CUDA; attention "compiled": compile=True (its decode forwards are the static step
    compiled and replayed as CUDA graphs; the rest runs the fast path)."""
    if attention == "triton":
        pytest.importorskip("triton")
    engine = build_tiny_engine(name, tokenizer, dtype=dtype, device="cuda")
    if attention == "compiled":
        engine = HogwildEngine(engine.model, engine.tokenizer, compile=True)
    return engine


def run_attention(attention: str) -> str:
    return "fast" if attention == "compiled" else attention


@pytest.mark.parametrize("attention", ["fast", "triton", "compiled"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_workers_match_their_views_on_cuda(tokenizer, layout, attention):
    engine = cuda_engine("qwen3", tokenizer, attention)
    run = engine.start(
        PROMPT,
        n_workers=4,
        layout=layout,
        protocol=named_script(PROMPT, 4),
        max_new_tokens=40,
        temperature=1.0,
        seed=1,
        attention=run_attention(attention),
    )
    assert drive_and_check(run, 16) >= 48
    if attention == "compiled":
        assert engine.decode_step.buckets_used  # decode forwards ran the compiled step


@pytest.mark.parametrize("attention", ["fast", "triton", "compiled"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cuda(tokenizer, dtype, attention):
    engine = cuda_engine("llama", tokenizer, attention, dtype=dtype)
    run = engine.start(
        PROMPT,
        n_workers=4,
        protocol=named_script(PROMPT, 4),
        max_new_tokens=20,
        attention=run_attention(attention),
    )
    for _ in range(10):
        expected = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
        record = run.step()
        for worker, reference in expected.items():
            assert_logits_close(record.logits[worker], reference, rel=HALF_PRECISION_REL)


def test_compiled_step_equals_eager_on_cuda(tokenizer):
    """100 steps of the compiled step (CUDA graphs, 3 workers: one padding row) beside the eager fast
    path, with injections and forced paragraph breaks; each bucket is captured once and replayed."""
    eager = build_tiny_engine("qwen3", tokenizer, device="cuda")
    compiled = HogwildEngine(eager.model, eager.tokenizer, compile=True)
    for engine in (eager, compiled):
        engine.eos_token_ids = frozenset()
    options = dict(n_workers=3, protocol=named_script(PROMPT, 3), max_new_tokens=120)
    runs = [engine.start(PROMPT, **options) for engine in (eager, compiled)]
    step_side_by_side(runs, 100, inject_at=40, force_every=9)
    graphs = compiled.decode_step._graphs[runs[1].pool]
    assert graphs and set(graphs) <= {shape for shape, _ in compiled.decode_step.buckets_used}


def test_many_runs_share_compiled_forwards_on_cuda(tokenizer):
    """Runs submitted together share each compiled decode forward; their tokens do not change."""
    eager = build_tiny_engine("llama", tokenizer, device="cuda")
    compiled = HogwildEngine(eager.model, eager.tokenizer, compile=True)
    prompts = [PROMPT, PROMPT + " Be brief.", "Count to ten."]
    options = dict(n_workers=2, max_new_tokens=16, temperature=1.0, seed=4)
    expected = eager.generate_many(prompts, **options)
    results = compiled.generate_many(prompts, **options)
    for want, got in zip(expected, results, strict=True):
        assert [w.token_ids for w in got.workers] == [w.token_ids for w in want.workers]


FEATURE_FAMILIES = ["gemma2", "gpt-oss", "deepseek-v2", "glm", "llama4-text", "mistral"]


@pytest.mark.parametrize("attention", ["fast", "triton", "compiled"])
@pytest.mark.parametrize("name", FEATURE_FAMILIES)
def test_model_families_on_cuda(tokenizer, name, attention):
    """One family per attention feature (windows, soft-caps, sinks, MLA, interleaved partial rotary,
    chunks with NoPE layers) on every CUDA path: each worker's logits equal its view's."""
    from tests.model_families import FAMILIES_BY_NAME
    from tests.test_model_families import build_model, drive, start

    if attention == "triton":
        pytest.importorskip("triton")
    model = build_model(FAMILIES_BY_NAME[name]).to("cuda")
    engine = HogwildEngine(model, tokenizer, compile=attention == "compiled")
    assert drive(start(engine, "combined", run_attention(attention)), 10) >= 20


# ---- quantized weights (weight-only schemes; what runs where is listed in the README) ------------------
def quantized_engine(tokenizer, quantization_config) -> HogwildEngine:
    """The embedded model's architecture (tiny, random weights) saved and reloaded with a quantization
    config, as a user would load a checkpoint."""
    import tempfile

    from transformers import AutoModelForCausalLM

    source = build_tiny_engine("llama", tokenizer).model
    with tempfile.TemporaryDirectory() as path:
        source.save_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config, dtype=torch.bfloat16, device_map="cuda"
        )
    return HogwildEngine(model.eval(), tokenizer)


def check_quantized(engine: HogwildEngine) -> None:
    """One worker = the quantized model's own greedy generate; 3 workers = the model over each view."""
    expected = hf_greedy(engine, PROMPT, 12)
    assert engine.generate(PROMPT, n_workers=1, max_new_tokens=12).workers[0].token_ids == expected
    run = engine.start(PROMPT, n_workers=3, protocol=named_script(PROMPT, 3), max_new_tokens=12)
    for _ in range(6):
        want = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
        record = run.step()
        for worker, reference in want.items():
            assert_logits_close(record.logits[worker], reference, rel=HALF_PRECISION_REL)


def test_torchao_int4_weight_only_on_cuda(tokenizer):
    torchao = pytest.importorskip("torchao")
    from transformers import TorchAoConfig

    config = TorchAoConfig(torchao.quantization.Int4WeightOnlyConfig(group_size=32))
    check_quantized(quantized_engine(tokenizer, config))


def test_bitsandbytes_4bit_on_cuda(tokenizer):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    check_quantized(quantized_engine(tokenizer, config))


def test_fine_grained_fp8_on_cuda(tokenizer):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9 or newer")
    from transformers import FineGrainedFP8Config

    check_quantized(quantized_engine(tokenizer, FineGrainedFP8Config()))
