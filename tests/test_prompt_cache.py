"""Prefix reuse across runs: several conversations at once, replies included, bounded in bytes."""

from __future__ import annotations

import torch

from hogwild_agents.prompt_cache import PromptCache
from tests.test_equivalence import assert_logits_close


def chat(engine, turns: list[tuple[str, str]], question: str) -> list[int]:
    messages = []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return engine.encode(engine.chat_prompt([*messages, {"role": "user", "content": question}]))


def test_interleaved_conversations_each_reuse_their_own_prefix(smol_engine):
    engine = smol_engine
    engine.prompt_cache.clear()
    options = dict(n_workers=1, max_new_tokens=6)
    a1 = chat(engine, [], "Tell me about the sea.")
    b1 = chat(engine, [], "What is a prime number? Explain it to a child.")
    engine.generate(a1, **options)
    engine.generate(b1, **options)
    a2 = chat(engine, [("Tell me about the sea.", "It is big.")], "And rivers?")
    b2 = chat(engine, [("What is a prime number? Explain it to a child.", "A number.")], "Why?")
    for first, second in ((a1, a2), (b1, b2)):  # the other conversation ran in between
        run = engine.start(second, **options)
        common = next((i for i, (x, y) in enumerate(zip(first, second, strict=False)) if x != y), len(first))
        assert run.reused_tokens >= common - 1
        run.close()


def test_a_single_raw_workers_reply_is_reused_by_the_next_turn(smol_engine):
    engine = smol_engine
    engine.prompt_cache.clear()
    question = "Name three colours."
    first = engine.generate([{"role": "user", "content": question}], n_workers=1, max_new_tokens=12)
    reply = first.workers[0].text
    follow_up = chat(engine, [(question, reply)], "And three animals?")
    run = engine.start(follow_up, n_workers=1, max_new_tokens=4, temperature=1.0, seed=2)
    prompt_then_reply = len(chat(engine, [], question)) + len(first.workers[0].token_ids)
    assert run.reused_tokens >= prompt_then_reply - 2  # the reply's K/V were kept, not re-encoded
    engine.prompt_cache.clear()
    fresh = engine.start(follow_up, n_workers=1, max_new_tokens=4, temperature=1.0, seed=2)
    assert fresh.reused_tokens == 0
    for _ in range(4):
        a, b = run.step(), fresh.step()
        assert a.chosen == b.chosen
        for worker, logits in a.logits.items():
            assert_logits_close(logits, b.logits[worker])


def test_the_cache_stays_within_its_bytes_least_recently_used_first():
    per_token = 2 * 4 * 2 * 8 * 4  # K and V x layers x kv_heads x head_dim x fp32
    cache = PromptCache(max_bytes=3 * 45 * per_token)

    def kv(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(4, 2, n, 8), torch.randn(4, 2, n, 8)

    sequences = [[s * 1000 + i for i in range(40)] for s in range(5)]
    for ids in sequences[:3]:
        cache.store_kv(ids, *kv(40))
    assert cache.common_prefix(sequences[0] + [7], 100) == 40
    cache.store_kv(sequences[3], *kv(40))  # evicts the least recently used: sequence 1
    assert cache.nbytes <= 3 * 45 * per_token and len(cache) == 3
    assert cache.common_prefix(sequences[1], 100) == 0
    assert cache.common_prefix(sequences[0], 100) == 40 and cache.common_prefix(sequences[3], 100) == 40
    cache.store_kv(sequences[0] + [1, 2, 3], *kv(43))  # extends an entry: replaces it
    assert len(cache) == 3 and cache.common_prefix(sequences[0] + [1, 2, 3, 4], 100) == 43
    assert cache.common_prefix([*sequences[0][:20], 99], 100) == 20  # a prefix inside a page
