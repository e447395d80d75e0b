"""Engine options that shape a run's prompt and context: `prompt_token_ids` and `max_context`."""

from __future__ import annotations

import pytest

from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.errors import ContextLengthError

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
    with pytest.raises(ValueError, match="max_context must be > 0"):
        engine.start("Hi", max_context=0)
