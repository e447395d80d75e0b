"""The re-prefill message-passing baseline: agents in their own sequences, each re-prefilling what the
others wrote every K tokens."""

from __future__ import annotations

import pytest

from hogwild_agents.evaluation.message_passing import agent_script, agent_seed, run_reprefill

MESSAGES = [{"role": "user", "content": "What is 6 * 7? Think it through."}]


@pytest.fixture
def embedded_tokens(tiny_engines):
    """The engine and a counter of the token ids its model embeds (a hook on the input embeddings)."""
    engine = tiny_engines["llama"]
    count = [0]
    hook = engine.model.get_input_embeddings().register_forward_hook(
        lambda module, inputs, output: count.__setitem__(0, count[0] + inputs[0].numel())
    )
    yield engine, count
    hook.remove()


def test_reprefill_embeds_more_tokens_than_the_shared_cache_at_the_same_budget(embedded_tokens):
    engine, count = embedded_tokens
    options = dict(protocol="collaborate", max_new_tokens=60, max_forward_passes=60, temperature=0.8, seed=4)
    result = run_reprefill(engine, MESSAGES, n_agents=2, sync_every=8, **options)
    reprefill_tokens, count[0] = count[0], 0
    hogwild = engine.generate(MESSAGES, n_workers=2, **options)
    assert result.usage.forward_tokens == reprefill_tokens  # its own count is what the model embedded
    assert hogwild.usage.forward_tokens == count[0]
    assert reprefill_tokens > count[0]
    assert result.forward_passes <= 60 and hogwild.forward_passes <= 60
    messages = [e for e in result.trace if e.kind == "message"]
    assert len(messages) >= 2 and [w.name for w in result.workers] == ["Alice", "Bob"]
    again = run_reprefill(engine, MESSAGES, n_agents=2, sync_every=8, **options)
    assert [w.token_ids for w in again.workers] == [w.token_ids for w in result.workers]  # deterministic


def test_agents_that_never_sync_are_the_same_runs_alone(tiny_engines):
    """Batched side by side, without messages, each agent is exactly its one-worker run alone."""
    engine = tiny_engines["llama"]
    options = dict(protocol="collaborate", max_new_tokens=10, temperature=0.8)
    result = run_reprefill(engine, MESSAGES, n_agents=3, sync_every=1000, seed=9, **options)
    script = engine.script(MESSAGES, 3, "interleaved", "collaborate", [])
    for i, worker in enumerate(result.workers):
        alone = engine.generate(
            MESSAGES, n_workers=1, layout="interleaved", seed=agent_seed(9, i),
            **{**options, "protocol": agent_script(script, i)},
        )  # fmt: skip
        assert worker.token_ids == alone.workers[0].token_ids[: len(worker.token_ids)]
        assert worker.generated_tokens == (alone.usage.generated_tokens if i == 0 else 10)
    assert not any(e.kind == "message" for e in result.trace)
    assert result.forward_passes > 10  # the first agent's finisher ran after its 10 tokens


def test_agents_are_told_apart(tiny_engines):
    engine = tiny_engines["llama"]
    script = engine.script(MESSAGES, 2, "interleaved", "collaborate", [])
    bob = agent_script(script, 1)
    assert bob.worker_names == ("Bob",) and bob.prompt == script.prompt
    assert bob.step_header(0, 3) == script.step_header(1, 3)
    assert len({agent_seed(5, i) for i in range(4)} | {agent_seed(6, 0)}) == 5
    with pytest.raises(ValueError, match="sync_every"):
        run_reprefill(engine, MESSAGES, n_agents=2, sync_every=0)
