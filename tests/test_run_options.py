"""Run options and controls: `prompt_token_ids`, `max_context`, logits processors, the finisher."""

from __future__ import annotations

import pytest
import torch

from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.errors import ContextLengthError, InvalidArgumentError
from hogwild_agents.results import StepEvent
from hogwild_agents.sampling import SamplingParams

PROMPT = "Count the apples: three and four."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6 * 7?"}]
TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
}


@pytest.mark.parametrize(
    ("prompt", "options"),
    [
        ("Plain text, verbatim.", {}),
        (MESSAGES, {}),
        (MESSAGES, {"protocol": "collaborate", "n_workers": 3}),
        (MESSAGES, {"protocol": "divide_and_conquer", "layout": "interleaved", "tools": [TOOL]}),
        (MESSAGES, {"protocol": "check_redundancy", "engine_tools": [calculator_tool()]}),
        ([5, 6, 7, 8], {}),
    ],
    ids=["text", "messages", "collaborate", "tools", "engine-tools", "token-ids"],
)
def test_prompt_token_ids_are_what_start_prefills(tiny_engines, prompt, options):
    engine = tiny_engines["llama"]
    counted = engine.prompt_token_ids(prompt, max_new_tokens=1, temperature=0.5, **options)
    run = engine.start(prompt, max_new_tokens=1, **options)
    try:
        assert counted == run.prompt_ids and len(counted) == run.result().usage.prompt_tokens
    finally:
        run.close()


def test_max_context_bounds_every_view(tiny_engines):
    engine = tiny_engines["llama"]
    prompt_length = len(engine.prompt_token_ids("Count with me: one two three"))
    limit = prompt_length + 12
    run = engine.start("Count with me: one two three", n_workers=2, max_new_tokens=100, max_context=limit)
    longest = 0
    while not run.done:
        longest = max([longest, *run.step().view_lengths.values()])
    # no view passes the limit, though each step adds two tokens to it (the worker's and the other's)
    assert limit - 2 < longest <= limit and all(w.finish_reason == "length" for w in run.workers)
    with pytest.raises(ContextLengthError, match=f"max_context is {prompt_length}"):
        engine.start("Count with me: one two three", max_context=prompt_length)
    with pytest.raises(ValueError, match="max_context must be >= 1"):
        engine.start("Hi", max_context=0)


def test_logits_processors_join_and_leave_one_worker(tiny_engines):
    engine = tiny_engines["llama"]
    token, order = engine.encode(" the")[0], []

    def noted(name):
        def note(input_ids, scores):
            order.append(name)
            return scores

        return note

    def only(input_ids, scores):
        return torch.where(torch.arange(scores.shape[-1]) == token, 0.0, float("-inf")).expand_as(scores)

    first, second = noted("first"), noted("second")
    run = engine.start(
        "Go.", n_workers=2, max_new_tokens=8, temperature=1.0, seed=0, logits_processors={0: [first]}
    )
    run.add_logits_processor(1, only)
    run.add_logits_processor(0, second)
    assert run.logits_processors(0) == [first, second] and run.logits_processors(1) == [only]
    assert run.step().chosen[1] == [token] and order == ["first", "second"]  # in the order added
    run.remove_logits_processor(1, only)
    run.remove_logits_processor(0, first)
    assert run.logits_processors(1) == [] and run.logits_processors(0) == [second]
    with pytest.raises(InvalidArgumentError, match="no logits processor"):
        run.remove_logits_processor(1, only)
    run.logits_processors(0).clear()  # a copy: the run's own list is unchanged
    run.step()
    assert order == ["first", "second", "second"]
    run.set_logits_processors(0, [])
    assert run.logits_processors(0) == []


def test_the_finisher_answers_greedily_and_leaves_the_run_sampling(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=2, protocol="collaborate", max_new_tokens=4, temperature=1.5, seed=2)
    sampling = run.sampling
    answer_steps = []
    run.add_listener(lambda e: isinstance(e, StepEvent) and answer_steps.append(e.record))
    while not run.done:
        run.step()
    before = len(answer_steps)
    assert run.conclude()
    assert run.sampling is sampling and sampling == SamplingParams(temperature=1.5, seed=2)
    finisher = next(w for w in run.workers if w.answering)
    answer = answer_steps[before:]
    sampled = [r for r in answer if r.sources.get(finisher.index) == "sampled"]
    assert sampled  # the answer was written by choosing tokens, each the most likely one
    for record in sampled:
        assert record.chosen[finisher.index] == [int(record.logits[finisher.index].argmax())]


@pytest.mark.parametrize(
    ("layout", "n_workers", "protocol"),
    [
        ("combined", 1, "collaborate"),
        ("combined", 3, "collaborate"),
        ("interleaved", 2, "collaborate"),
        ("contiguous", 2, "collaborate"),
        ("combined", 1, None),
    ],
)
def test_max_forward_passes_caps_the_run_with_the_finisher_inside(tiny_engines, layout, n_workers, protocol):
    engine = tiny_engines["llama"]
    options = dict(n_workers=n_workers, layout=layout, protocol=protocol, max_new_tokens=500, seed=1)
    for cap in (2, 9, 40, 70):
        result = engine.generate(MESSAGES if protocol else PROMPT, max_forward_passes=cap, **options)
        assert 0 < result.forward_passes <= cap
        if protocol is not None and cap >= 40:  # room for the finisher: it answers inside the cap
            assert any(e.kind == "forced" for e in result.trace) and result.final_text
    free = engine.generate(MESSAGES if protocol else PROMPT, **{**options, "max_new_tokens": 12})
    assert free.forward_passes >= free.steps - 1 > 0  # counted without a cap too


def test_max_forward_passes_counts_injected_blocks_and_refuses_bad_caps(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=2, max_new_tokens=100, max_forward_passes=12)
    run.step()
    run.inject(" a shared note " * 100)  # 301+ tokens: two chunked forwards
    while not run.done:
        run.step()
    result = run.result()
    assert result.forward_passes <= 12 and result.forward_passes >= 3
    for bad in (1, 0, 2.5, "8"):
        with pytest.raises(InvalidArgumentError, match="max_forward_passes"):
            engine.start(PROMPT, max_forward_passes=bad)


@pytest.mark.parametrize(("layout", "n_workers"), [("combined", 2), ("contiguous", 2), ("interleaved", 3)])
def test_the_answer_at_a_checkpoint_is_the_capped_runs_answer(tiny_engines, layout, n_workers):
    """Read on a fork at the step where a capped run would stop, the answer at each budget equals a run
    capped there (same seed), token for token; the run it was read from goes on as if never forked."""
    engine = tiny_engines["llama"]
    options = dict(n_workers=n_workers, layout=layout, protocol="collaborate", temperature=0.8, seed=7)
    caps = (36, 50, 75)
    run = engine.start(MESSAGES, max_new_tokens=100, max_forward_passes=100, **options)
    read = {}
    while not run.done:
        run.step()
        for cap in caps:
            if cap not in read and run.stops_at(cap):
                read[cap] = run.answer_at(cap)
    run.conclude()
    assert set(read) == set(caps)
    untouched = engine.generate(MESSAGES, max_new_tokens=100, max_forward_passes=100, **options)
    assert [w.token_ids for w in run.result().workers] == [w.token_ids for w in untouched.workers]
    for cap, result in read.items():
        capped = engine.generate(MESSAGES, max_new_tokens=cap, max_forward_passes=cap, **options)
        assert [w.token_ids for w in result.workers] == [w.token_ids for w in capped.workers]
        assert (result.final_text, result.forward_passes) == (capped.final_text, capped.forward_passes)
        assert result.forward_passes <= cap


def test_a_fork_is_independent_and_gives_its_pages_back(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start(PROMPT, n_workers=2, max_new_tokens=20, temperature=1.0, seed=3)
    for _ in range(5):
        run.step()
    in_use = run.pool.pages_in_use
    twin = run.fork()
    assert run.pool.pages_in_use == 2 * in_use
    for _ in range(6):
        twin.step()
    alone = engine.start(PROMPT, n_workers=2, max_new_tokens=20, temperature=1.0, seed=3)
    for _ in range(11):
        alone.step()
    for _ in range(6):
        run.step()
    streams = [w.stream for w in alone.workers]
    assert [w.stream for w in run.workers] == [w.stream for w in twin.workers] == streams
    twin.close()
    assert run.pool.pages_in_use == run.cache.pages_held
