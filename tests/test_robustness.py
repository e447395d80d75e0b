"""Limits, interruptions and repeated use leave the engine correct and nothing generated is lost."""

from __future__ import annotations

import gc

import pytest
import torch

from tests.test_equivalence import PROMPT


def live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                total += obj.untyped_storage().nbytes()
        except (ReferenceError, RuntimeError):
            continue
    return total


def test_a_timeout_stops_cleanly_and_keeps_every_token(tiny_engines):
    engine = tiny_engines["llama"]
    result = engine.generate(PROMPT, n_workers=2, protocol="collaborate", max_new_tokens=4000, timeout_s=3.0)
    assert result.finish_reason == "timeout"
    assert {w.finish_reason for w in result.workers} == {"timeout"}
    for worker in result.workers:
        assert worker.generated_tokens > 0
        assert engine.decode(worker.token_ids) == worker.text
    with pytest.raises(ValueError, match="timeout_s"):
        engine.start(PROMPT, timeout_s=0)


def test_an_interrupt_mid_run_leaves_the_engine_usable(tiny_engines):
    engine = tiny_engines["qwen2"]
    options = dict(n_workers=3, protocol="collaborate", max_new_tokens=12, temperature=1.0, seed=11)
    expected = engine.generate(PROMPT, **options)

    def interrupt(record):
        if record.index == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPT, on_step=interrupt, **options)
    assert not engine.busy  # the interrupted run was stopped and released
    again = engine.generate(PROMPT, **options)
    assert [w.token_ids for w in again.workers] == [w.token_ids for w in expected.workers]


def test_a_hundred_runs_do_not_grow_memory(tiny_engines):
    engine = tiny_engines["llama"]
    for _ in range(2):
        engine.generate(PROMPT, n_workers=2, protocol="collaborate", max_new_tokens=3)
    baseline = live_tensor_bytes() - engine.prompt_cache.nbytes
    for i in range(100):
        engine.generate(PROMPT + str(i % 7), n_workers=2, protocol="collaborate", max_new_tokens=3)
    # the prefix cache keeps recent prompts on purpose (bounded in bytes); everything else is released
    assert 0 < engine.prompt_cache.nbytes <= engine.prompt_cache.max_bytes
    grown = live_tensor_bytes() - engine.prompt_cache.nbytes - baseline
    assert grown <= 64 * 1024, f"live tensors grew by {grown} bytes over 100 runs"
