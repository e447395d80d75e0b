"""Protocols inside real runs: views, separators, interjections and the finisher."""

from __future__ import annotations

import torch

from hogwild_agents.protocol import Protocol, shipped_protocols


def test_every_shipped_protocol_runs_in_every_layout(tiny_engines):
    engine = tiny_engines["llama"]
    for name in shipped_protocols():
        for layout in ("contiguous", "interleaved", "combined"):
            run = engine.start("Add 2 and 3.", n_workers=2, layout=layout, protocol=name, max_new_tokens=4)
            view = run.view_token_ids(1)
            assert view[: run.prompt_tokens] == engine.encode(run.script.prompt)
            assert run.workers[1].pending == engine.encode(run.script.step_header(1, 1))
            while not run.done:
                run.step()


def test_combined_views_separate_the_others_steps_in_progress(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start("Add 2 and 3.", n_workers=3, protocol="collaborate", max_new_tokens=20)
    for _ in range(4):
        run.step()
    text = engine.decode(run.view_token_ids(2)[run.cache.shared_length :])
    others, own = text.split("### Your current step")
    assert others.startswith(run.script.others_header)
    alice, bob = others[len(run.script.others_header) :].split(run.script.others_separator.strip())[:2]
    assert alice.startswith("**Alice [1]:**") and bob.strip().startswith("**Bob [1]:**")
    assert "(you are Carol)" in own and "**Carol [1]:**" in own


def test_an_interjection_lands_in_one_stream_at_the_period(smol_engine):
    protocol = Protocol("check_redundancy", interjection_period=6)
    run = smol_engine.start(
        "Count from one to twenty.", n_workers=2, protocol=protocol, max_new_tokens=20, layout="contiguous"
    )
    records = []
    while not run.done:
        records.append(run.step())
    interjection_ids = smol_engine.encode(run.script.interjection)
    for worker in (0, 1):
        chosen = [(r.sources[worker], r.chosen[worker]) for r in records if worker in r.sources]
        sampled_since = 0
        landed = 0
        for source, ids in chosen:
            if source == "interjection":
                assert ids == interjection_ids and sampled_since >= 6
                landed += 1
                sampled_since = 0
            elif source == "sampled":
                sampled_since += 1
        assert landed == 3  # 20 sampled tokens, an interjection every 6: after 6, 12 and 18
    events = [e for e in run.trace if e.kind == "interjection"]
    assert len(events) == 6 and all(e.worker in (0, 1) for e in events)
    assert all(
        len({e.worker for e in events if e.step == s}) == len([e for e in events if e.step == s])
        for s in {e.step for e in events}
    )


def test_the_finisher_extracts_an_answer_when_the_budget_runs_out(smol_engine):
    result = smol_engine.generate("What is 3 + 4?", n_workers=2, protocol="collaborate", max_new_tokens=6)
    assert all(w.finish_reason for w in result.workers)
    assert result.answer is not None and result.final_text == result.answer
    assert "Final answer:" in result.workers[0].text


def test_the_first_final_answer_ends_the_work_for_everyone(tiny_engines):
    engine = tiny_engines["llama"]
    run = engine.start("What is 3 + 4?", n_workers=3, protocol="collaborate", max_new_tokens=50)
    for _ in range(3):
        run.step()
    assert not any(w.finished for w in run.workers)
    run.force(1, " so it is \\boxed{7}")
    record = run.step()
    assert record.finished == {0: "stop", 1: "stop", 2: "stop"}
    while not run.done:
        run.step()  # the last chosen tokens are still written
    result = run.result()
    assert result.answer == "7" and result.final_text == "7"
    assert result.workers[1].text.endswith("\\boxed{7}")


def test_the_finisher_answer_holds_no_step_header_after_an_early_stop(tiny_engines):
    """A worker that stopped (EOS) mid-step still has that step to close; the finisher must not open a
    new step (with its header) inside the answer it forces."""
    engine = tiny_engines["llama"]
    eos = min(engine.eos_token_ids)
    calls = []

    def eos_first(input_ids, scores):
        calls.append(1)
        if len(calls) == 3:  # after two sampled tokens, stop the worker
            scores = torch.full_like(scores, float("-inf"))
            scores[..., eos] = 0.0
        return scores

    options = dict(n_workers=1, protocol="collaborate", max_new_tokens=20, logits_processors=[eos_first])
    result = engine.generate("What is 3 + 4?", **options)
    text = result.workers[0].text
    finisher = engine.script("What is 3 + 4?", 1, "combined", "collaborate").finisher
    assert finisher in text and "[2]:**" not in text.split(finisher)[1]
