"""Every decoder family in `tests/model_families.py`: exact on every attention path, or refused at
construction with UnsupportedModelError naming the reason.

For a supported family (tiny random weights, fp32, peaked logits), one worker must reproduce transformers'
own greedy `generate` over a prompt several sliding windows long, and with three workers every worker's
logits must equal the model's own attention over its view (`view_kv_logits`) at every step, after forced
tokens, a tool result, an injection and history moves, in all three layouts, on the fast path, the eager
reference path and the static decode step. The compiled step (`compile=True`, inductor) runs the same
check on one family per attention feature here (compiling every family takes longer than the suite may);
`scripts/model_support.py` compiles every family and writes the README's support table.
"""

from __future__ import annotations

import concurrent.futures as futures
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from hogwild_agents import LAYOUTS, HogwildEngine, UnsupportedModelError
from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.reference import view_kv_logits
from hogwild_agents.static_step import StaticDecodeStep
from tests.conftest import named_script
from tests.model_families import FAMILIES, FAMILIES_BY_NAME, WINDOW, Family
from tests.test_equivalence import assert_logits_close, hf_greedy

PROMPT = (
    "<|im_start|>user\nList three prime numbers and explain why each of them is prime. Then list three "
    "more, say which of the six is the largest, and check your answer with the calculator. Leave a blank "
    "line after each step, and keep every step short, clear, easy to follow for a young reader.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
SUPPORTED = [f.name for f in FAMILIES if f.supported]
REFUSED = [f.name for f in FAMILIES if not f.supported]
# the compiled step on one family per attention feature (plain Llama: tests/test_compile.py): soft-capping
# with sliding windows, sinks, multi-head latent attention with a decoupled rotary part, interleaved
# partial rotary, chunked attention with NoPE layers
COMPILED = ["gemma2", "gpt-oss", "deepseek-v2", "glm", "llama4-text"]


def build_model(family: Family) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family.config(), dtype=torch.float32)
    with torch.no_grad():  # larger random weights: peaked logits, no near-ties for greedy comparisons
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def family_engines(tokenizer):
    """Engines of the supported families, built on first use and kept for the module."""
    built: dict[str, HogwildEngine] = {}

    def get(name: str) -> HogwildEngine:
        if name not in built:
            built[name] = HogwildEngine(build_model(FAMILIES_BY_NAME[name]), tokenizer)
        return built[name]

    return get


def call_text(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_the_catalogue_covers_the_families_the_engine_claims():
    assert len(SUPPORTED) >= 20 and len(REFUSED) >= 5
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)
    assert set(COMPILED) <= set(SUPPORTED)


@pytest.mark.parametrize("name", REFUSED)
def test_refused_at_construction(tokenizer, name):
    family = FAMILIES_BY_NAME[name]
    with pytest.raises(UnsupportedModelError, match=family.refusal):
        HogwildEngine(build_model(family), tokenizer)


@pytest.mark.parametrize("name", SUPPORTED)
def test_one_worker_reproduces_generate(family_engines, name):
    engine = family_engines(name)
    assert len(engine.encode(PROMPT)) > 3 * WINDOW  # several sliding windows / chunks
    expected = hf_greedy(engine, PROMPT, 12)
    for attention in ("fast", "eager"):
        result = engine.generate(PROMPT, n_workers=1, max_new_tokens=12, attention=attention)
        assert result.workers[0].token_ids == expected, attention


def check_step(run) -> int:
    """One step of a run, every fed worker's logits against the model's attention over its view."""
    for call in run.tool_calls:  # let a pending tool finish first, so that the result lands now
        if call.future is not None:
            futures.wait([call.future], timeout=run.tool_runner.timeout_s + 0.1)
    run.poll_tools()  # what step() does first, so that the references see the same views
    expected = {w.index: view_kv_logits(run, w.index) for w in run.workers if w.pending}
    views = {i: run.view_token_ids(i) for i in expected}
    record = run.step()
    checked = 0
    for worker, reference in expected.items():
        assert record.views[worker] == views[worker]
        if worker in record.logits:
            assert_logits_close(record.logits[worker], reference)
            checked += 1
    return checked


def drive(run, steps: int) -> int:
    """Forced tokens, a tool call and its result, forced step ends (history moves) and an injection,
    every step checked against the materialised-view reference. Returns the logits checked."""
    checked = 0
    for step in range(steps):
        if step == 1:
            run.force(1, call_text("calculator", expression="6 * 7"))
        if step in (3, 7):
            run.force(step % 3, " forced words.\n\n")
        if step == 5:
            run.inject("\n\n[note] an injected block everyone sees.\n\n")
        checked += check_step(run)
    assert any(e.kind == "tool_result" for e in run.trace), "the tool result never arrived"
    return checked


def start(engine: HogwildEngine, layout: str, attention: str = "fast"):
    run = engine.start(
        PROMPT,
        n_workers=3,
        layout=layout,
        protocol=named_script(PROMPT, 3),
        max_new_tokens=40,
        engine_tools=[calculator_tool()],
        attention=attention,
        temperature=1.0,
        seed=1,
    )
    run.record_views = True
    return run


def static_engine(engine: HogwildEngine, **options) -> HogwildEngine:
    other = HogwildEngine(engine.model, engine.tokenizer)
    other.decode_step = StaticDecodeStep(engine.model, **options)
    return other


@pytest.mark.parametrize("name", SUPPORTED)
def test_workers_match_their_views_on_every_path(family_engines, name):
    engine = family_engines(name)
    static = static_engine(engine)
    for layout in LAYOUTS:
        for path, run in (
            ("fast", start(engine, layout)),
            ("eager", start(engine, layout, "eager")),
            ("static", start(static, layout)),
        ):
            assert drive(run, 10) >= 20, (layout, path)
            if layout != "contiguous":
                assert run.cache.shared_length > run.prompt_tokens, (layout, path)  # history moved
            view = run.view_token_ids(0)
            assert len(view) > 4 * WINDOW, (layout, path)  # views span several windows
    assert static.decode_step.buckets_used  # decode forwards went through the static step


@pytest.mark.parametrize("name", COMPILED)
def test_the_compiled_step_matches_the_views(family_engines, name):
    engine = family_engines(name)
    compiled = HogwildEngine(engine.model, engine.tokenizer, compile=True)
    run = start(compiled, "combined")
    counters.clear()
    assert drive(run, 10) >= 20
    assert compiled.decode_step.buckets_used
    assert counters["stats"]["unique_graphs"] <= len(compiled.decode_step.buckets_used)  # no recompiles
