"""Per-worker logits processors: transformers' convention, per-worker selection, clear failures."""

from __future__ import annotations

import pytest
import torch
from transformers import SuppressTokensLogitsProcessor

from hogwild_agents import LogitsProcessorError
from tests.test_equivalence import PROMPT


class OnlyToken:
    """Allows a single token id."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = torch.full_like(scores, float("-inf"))
        out[:, self.token_id] = 0.0
        return out


class Recorder:
    """Records the input ids it is given; leaves the scores alone."""

    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        assert input_ids.dtype == torch.long and input_ids.shape[0] == 1 and scores.shape[0] == 1
        self.seen.append(input_ids[0].tolist())
        return scores


def test_a_transformers_processor_suppresses_tokens(tiny_engines):
    engine = tiny_engines["llama"]
    plain = engine.generate(PROMPT, n_workers=2, max_new_tokens=8)
    banned = sorted({t for w in plain.workers for t in w.token_ids})
    result = engine.generate(
        PROMPT, n_workers=2, max_new_tokens=8, logits_processors=[SuppressTokensLogitsProcessor(banned)]
    )
    for worker in result.workers:
        assert worker.token_ids and not set(worker.token_ids) & set(banned)


def test_processors_can_target_one_worker_and_logits_stay_the_models(tiny_engines):
    engine = tiny_engines["llama"]
    token = engine.encode(" sea")[0]
    run = engine.start(PROMPT, n_workers=2, max_new_tokens=6, logits_processors={0: [OnlyToken(token)]})
    raw = []
    while not run.done:
        record = run.step()
        if 0 in record.logits:
            raw.append(record.logits[0][token].item())
    assert run.workers[0].generated == 6 and set(run.workers[0].stream) == {token}
    assert set(run.workers[1].stream) != {token}
    assert any(value != 0.0 for value in raw)  # records hold the model's logits, not the processed ones


def test_processors_see_the_prompt_and_the_workers_own_stream(tiny_engines):
    engine = tiny_engines["qwen3"]
    recorder = Recorder()
    run = engine.start(PROMPT, n_workers=2, max_new_tokens=4, logits_processors={1: [recorder]})
    seen_at_step = []
    while not run.done:
        stream_before = list(run.workers[1].stream)
        calls = len(recorder.seen)
        run.step()
        if len(recorder.seen) > calls:
            seen_at_step.append((recorder.seen[-1], stream_before))
    assert len(seen_at_step) == 4
    for ids, stream in seen_at_step:
        assert ids == run.prompt_ids + stream


def test_a_failing_processor_names_the_worker_and_the_run_can_go_on(tiny_engines):
    engine = tiny_engines["llama"]
    calls = {"n": 0}

    def flaky(input_ids, scores):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyError("boom")
        return scores

    run = engine.start(PROMPT, n_workers=2, max_new_tokens=5, logits_processors={1: [flaky]})
    run.step()
    with pytest.raises(LogitsProcessorError, match=r"worker .*boom"):
        run.step()
    while not run.done:  # the failed step chose nothing; the next one chooses
        run.step()
    assert [w.generated for w in run.workers] == [5, 5]


@pytest.mark.parametrize(
    ("processors", "error", "message"),
    [
        ({5: []}, ValueError, "workers are numbered 0..1"),
        (["not callable"], TypeError, "not callable"),
        ([lambda ids, scores: scores[0]], LogitsProcessorError, "must return scores of shape"),
        ([lambda ids, scores: torch.full_like(scores, float("-inf"))], LogitsProcessorError, "no token"),
    ],
)
def test_bad_processors_get_clear_errors(tiny_engines, processors, error, message):
    engine = tiny_engines["llama"]
    with pytest.raises(error, match=message):
        engine.generate(PROMPT, n_workers=2, max_new_tokens=3, logits_processors=processors)
