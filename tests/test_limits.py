"""Limits that hold: the context, long writes, memory by budget, and the finisher's answer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from hogwild_agents import HogwildEngine
from hogwild_agents.run import FINISHER_TOKENS, WRITE_CHUNK
from hogwild_agents.views import LAYOUTS
from tests.conftest import TINY, named_script

PROMPT = "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def small_context(tokenizer) -> HogwildEngine:
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "max_position_embeddings": 60})
    return HogwildEngine(AutoModelForCausalLM.from_config(config).eval(), tokenizer)


class ForwardWatch:
    """Records the longest view and the largest position of every forward the engine runs."""

    def __init__(self, engine: HogwildEngine) -> None:
        self.engine, self.forward = engine, engine.forward
        self.views: list[int] = []
        self.positions: list[int] = []
        self.tokens: list[int] = []

    def __enter__(self) -> ForwardWatch:
        def watched(plan, attend):
            self.views.append(max(plan.view_lengths))
            self.positions.append(int(plan.position_ids.max()))
            self.tokens.append(plan.n_tokens)
            return self.forward(plan, attend)

        self.engine.forward = watched
        return self

    def __exit__(self, *exc: object) -> None:
        del self.engine.forward


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_forward_stays_within_the_context(small_context, layout):
    engine = small_context
    with ForwardWatch(engine) as watch:
        run = engine.start(
            PROMPT,
            n_workers=3,
            layout=layout,
            protocol=named_script(PROMPT, 3),
            max_new_tokens=500,
            temperature=1.0,
            seed=1,
        )
        step = 0
        while not run.done:
            if step % 3 == 1 and not run.workers[step % 3].finished:
                run.force(step % 3, " forced words to fill the context\n\n")
            if step == 1:
                run.inject("\n\nNote.\n\n")
            run.step()
            step += 1
    assert max(watch.views) <= 60 and max(watch.positions) < 60
    assert {w.finish_reason for w in run.workers} == {"length"}


def test_the_context_holds_under_max_context_too(tiny_engines):
    engine = tiny_engines["llama"]
    with ForwardWatch(engine) as watch:
        result = engine.generate(
            PROMPT, n_workers=2, layout="interleaved", max_new_tokens=400, max_context=50, temperature=1.0
        )
    assert max(watch.views) <= 50 and result.finish_reason == "length"


def test_an_inject_past_the_context_is_refused(small_context):
    run = small_context.start(PROMPT, n_workers=2, max_new_tokens=10)
    with pytest.raises(ValueError, match="context"):
        run.inject("word " * 80)


def test_long_forced_and_injected_text_goes_in_chunks(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=2, max_new_tokens=20)
    long_text = "lorem ipsum dolor sit amet " * 200  # about 1000 tokens
    with ForwardWatch(engine) as watch:
        run.force(1, long_text)
        run.step()
        run.step()
        run.inject(long_text)
    assert max(watch.tokens) <= WRITE_CHUNK + 2  # a chunk, plus the other worker's token
    assert sum(watch.tokens) >= 2 * len(engine.encode(long_text))
    assert run.workers[1].stream[-len(engine.encode(long_text)) - 1 : -1] == engine.encode(long_text)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_follows_what_is_written_not_the_budget(tiny_engines, layout):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=3, layout=layout, max_new_tokens=10**9)
    for _ in range(5):
        run.step()
    per_token = run.cache.shape.bytes_per_token
    assert run.pool.bytes_allocated <= 4 * (run.cache.tokens_stored + 16 * 8) * per_token
    run.close()


def test_the_finisher_answers_and_never_returns_a_transcript(smol_engine):
    budget = 24
    result = smol_engine.generate(
        "What is 2+3?", n_workers=2, protocol="collaborate", max_new_tokens=budget, temperature=0.6, seed=0
    )
    assert "**Alice [" not in result.final_text and "**Bob [" not in result.final_text
    assert "\n\n" not in result.final_text.strip()
    for worker in result.workers:
        assert worker.generated_tokens <= budget + FINISHER_TOKENS
    if result.answer is not None:
        assert result.final_text == result.answer


def test_the_finisher_stops_at_a_paragraph_break_when_the_brace_never_closes(tiny_engines):
    """A random-weight model never closes the brace: the answer still ends, headers never follow."""
    engine = tiny_engines["qwen2"]
    result = engine.generate(PROMPT, n_workers=2, protocol="collaborate", max_new_tokens=8, seed=3)
    finisher = next(w for w in result.workers if "Final answer" in w.text)
    after = finisher.text.split("\\boxed{", 1)[-1]
    assert "**Alice [" not in after and "**Bob [" not in after
    assert result.final_text == after.split("\n\n")[0].strip() or result.answer is not None
