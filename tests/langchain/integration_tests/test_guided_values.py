"""Guided JSON: integer, number and boolean values are constrained while they are written."""

from __future__ import annotations

import json

import pytest

from langchain_hogwild._guided import GuidedWriter, object_program

SCHEMA = {
    "type": "object",
    "properties": {
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "ok": {"type": "boolean"},
        "label": {"type": "string"},
    },
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_model_writes_values_of_the_right_type(tiny_engines, seed):
    """Random weights sampled at temperature 1 write junk when free; the masks keep every typed value
    valid JSON of its type, as written (not coerced afterwards), and the caller's processors stay."""
    engine = tiny_engines["llama"]
    seen = []

    def caller_processor(input_ids, scores):
        seen.append(input_ids.shape[1])
        return scores

    run = engine.start(
        "Fill in the form.",
        n_workers=2,
        max_new_tokens=80,
        temperature=1.0,
        seed=seed,
        logits_processors={0: [caller_processor]},
    )
    writer = GuidedWriter(run, 0, object_program(SCHEMA))
    while not writer.done and not run.done:
        writer.observe(run.step())
    assert writer.done
    value = writer.value
    assert type(value["count"]) is int and type(value["ok"]) is bool
    assert isinstance(value["ratio"], int | float) and not isinstance(value["ratio"], bool)
    text = run.workers[0].text
    written, _ = json.JSONDecoder().raw_decode(text[text.index("{") :])
    typed = ("count", "ratio", "ok")
    assert {k: written[k] for k in typed} == {k: value[k] for k in typed}  # the JSON as written is valid
    assert run.logits_processors[0] == [caller_processor] and seen
