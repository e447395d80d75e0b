"""Grammar-constrained output: random-weight models sampled at temperature 1 write junk when free; under a
grammar every output parses and validates against its schema, within the token budget."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from hogwild_agents.errors import GrammarError
from hogwild_agents.grammar import (
    Constraint,
    closed_objects,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)
from hogwild_agents.tool_calls import ParsedToolCall

SEEDS = range(30)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "nicknames": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
        "colour": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "pets": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0}},
                "required": ["kind"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
        "note": {"type": "string"},
        "verified": {"type": "boolean"},
    },
    "required": ["name", "nicknames", "colour", "age", "score", "address", "pets"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "tag",
            "parameters": {
                "type": "object",
                "properties": {"labels": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
                "required": ["labels"],
            },
        },
    },
]


def constrained_run(engine, grammar, seed, max_new_tokens=48, n_workers=2, **options):
    """Run worker 0 under `grammar` at temperature 1 until the grammar is complete or the run ends."""
    constraint = Constraint(engine, grammar, budget=max_new_tokens)
    run = engine.start(
        "Write the record.",
        n_workers=n_workers,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        seed=seed,
        logits_processors={0: [constraint]},
        **options,
    )
    while not run.done and not constraint.stopped:
        run.step()
    constraint.sync(run.prompt_ids + run.workers[0].stream)
    return run, constraint


@pytest.mark.parametrize("seed", SEEDS)
def test_every_output_validates_against_its_schema(tiny_engines, seed):
    """Strings with bounds and patterns, arrays of strings and of objects, enums, nested objects,
    optional fields, bounded numbers: the constrained text always parses and validates, and a budget
    too short for free writing still ends with the value complete in the worker's own text."""
    engine = tiny_engines["llama"]
    grammar = json_schema_grammar(PERSON)
    run, constraint = constrained_run(engine, grammar, seed, max_new_tokens=80)
    value = json.loads(constraint.text)  # the worker's own text, no completion needed
    jsonschema.validate(value, PERSON)
    assert value == constraint.value()
    assert set(value) <= set(PERSON["properties"])  # no keys the schema does not list
    assert run.workers[0].text.endswith(constraint.text)
    assert run.workers[0].generated <= 80


@pytest.mark.parametrize("seed", SEEDS)
def test_tool_calls_name_a_tool_and_validate_its_arguments(tiny_engines, seed):
    engine = tiny_engines["qwen2"]
    grammar = tool_call_grammar(TOOLS, name=None if seed % 3 else "tag")
    _, constraint = constrained_run(engine, grammar, seed, max_new_tokens=40, n_workers=1)
    call = constraint.value()
    assert isinstance(call, ParsedToolCall) and call.valid
    assert call.name in {"get_weather", "tag"} if seed % 3 else call.name == "tag"
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.name)
    jsonschema.validate(call.arguments, schema)
    assert constraint.text.startswith("<tool_call>") and constraint.text.endswith("</tool_call>")


@pytest.mark.parametrize("seed", range(10))
def test_json_mode_and_call_or_answer(tiny_engines, seed):
    engine = tiny_engines["qwen3"]
    _, free = constrained_run(engine, json_object_grammar(), seed, max_new_tokens=30, n_workers=1)
    assert isinstance(json.loads(free.finish()), dict)
    answer = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    _, either = constrained_run(
        engine, tool_call_grammar(TOOLS, or_json=answer), seed, max_new_tokens=30, n_workers=1
    )
    value = either.value()
    if isinstance(value, ParsedToolCall):
        assert value.valid and value.name in {"get_weather", "tag"}
    else:
        jsonschema.validate(value, answer)


def test_a_complete_value_ends_the_worker_and_the_callers_processors_stay(tiny_engines):
    """Once the grammar is complete only end-of-sequence may follow; the caller's processors run too."""
    engine = tiny_engines["llama"]
    seen = []

    def caller(input_ids, scores):
        seen.append(input_ids.shape[1])
        return scores

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    constraint = Constraint(engine, json_schema_grammar(schema))
    run = engine.start(
        "Answer.",
        n_workers=2,
        max_new_tokens=60,
        temperature=1.0,
        seed=3,
        logits_processors={0: [caller, constraint]},
    )
    while not run.done:
        run.step()
    worker = run.workers[0]
    assert worker.finish_reason == "stop" and worker.generated < 60  # ended by end-of-sequence
    assert json.loads(worker.text) == constraint.value() and constraint.stopped
    assert len(seen) == worker.generated + 1  # every sampled token, and the end-of-sequence choice


def test_tokens_the_grammar_refuses_are_skipped(tiny_engines):
    """Text put into the stream from outside (a header, an interjection) is not part of the value."""
    engine = tiny_engines["llama"]
    run = engine.start("Go.", n_workers=1, max_new_tokens=40, temperature=1.0, seed=1)
    start = len(run.prompt_ids) + len(run.workers[0].stream)
    constraint = Constraint(
        engine, json_schema_grammar({"type": "object", "properties": {"a": {}}}), start=start
    )
    run.add_logits_processor(0, constraint)
    run.force(0, " (interjection) ")
    while not run.done and not constraint.stopped:
        run.step()
    constraint.sync(run.prompt_ids + run.workers[0].stream)
    assert run.workers[0].text.startswith(" (interjection) ") and "interjection" not in constraint.text
    assert constraint.skipped > 0
    json.loads(constraint.finish())


def test_a_worker_stopped_early_is_completed(tiny_engines):
    engine = tiny_engines["llama"]
    constraint = Constraint(engine, json_schema_grammar(PERSON))  # no budget: nothing steers it closed
    run = engine.start(
        "Go.", n_workers=1, max_new_tokens=6, temperature=1.0, seed=0, logits_processors=[constraint]
    )
    while not run.done:
        run.step()
    constraint.sync(run.prompt_ids + run.workers[0].stream)
    assert not constraint.complete and len(constraint.token_ids) == 6
    finished = constraint.finish()
    assert finished.startswith(constraint.text)
    jsonschema.validate(json.loads(finished), PERSON)


def test_objects_are_closed_unless_the_schema_opens_them():
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a key named so
            "free": {"type": "object", "additionalProperties": True, "properties": {"y": {}}},
            "items": {"type": "array", "items": {"type": "object", "properties": {"z": {}}}},
        },
        "$defs": {"d": {"type": "object", "properties": {"w": {}}}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["properties"]["properties"]  # the key map
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["properties"]["items"]["items"]["additionalProperties"] is False
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is not changed


def test_bad_schemas_and_tools_fail_with_a_clear_error(tiny_engines):
    with pytest.raises(GrammarError, match="JSON schema"):
        json_schema_grammar({"type": "strin"})
    with pytest.raises(GrammarError, match="must be a dict"):
        json_schema_grammar(["not", "a", "schema"])
    with pytest.raises(GrammarError, match="No tool is named 'nope'"):
        tool_call_grammar(TOOLS, "nope")
    with pytest.raises(GrammarError, match="at least one tool"):
        tool_call_grammar([])


def test_unknown_keywords_are_ignored_not_refused(tiny_engines):
    """A pydantic set[str] has uniqueItems, which llguidance does not implement: still usable."""
    grammar = json_schema_grammar({"type": "array", "items": {"type": "string"}, "uniqueItems": True})
    constraint = Constraint(tiny_engines["llama"], grammar, start=0)
    constraint.sync(tiny_engines["llama"].encode('["a","b"]'))
    assert constraint.value() == ["a", "b"]


def test_masks_cover_a_larger_model_vocabulary(tiny_engines):
    """Logits wider than the tokenizer (padded vocabularies) are masked beyond it."""
    engine = tiny_engines["llama"]
    constraint = Constraint(engine, json_object_grammar(), start=0)
    scores = torch.zeros(1, len(engine.tokenizer) + 64)
    masked = constraint(torch.zeros(1, 0, dtype=torch.long), scores)
    assert torch.isinf(masked[0, len(engine.tokenizer) :]).all()
    allowed = torch.nonzero(~torch.isinf(masked[0])).flatten().tolist()
    assert allowed and all(engine.tokenizer.decode([t]).startswith("{") for t in allowed)
