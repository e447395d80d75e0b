"""Drive a run one lockstep step at a time: force tokens, inject a shared note, inspect views.

Run: .venv/bin/python examples/step_by_step.py [--steps N]
"""

from __future__ import annotations

import argparse

from hogwild_agents import HogwildEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()

    engine = HogwildEngine.from_pretrained()
    run = engine.start(
        "Plan a small picnic for four friends.", n_workers=2, layout="contiguous", max_new_tokens=args.steps
    )
    for step in range(args.steps):
        if run.done:
            break
        if step == 4:
            run.force(1, " I will bring the drinks.")
        if step == 8:
            run.inject("\n\n(Note for everyone: it may rain this afternoon.)\n\n")
        record = run.step()
        print(
            f"step {record.index:2d}: "
            + " | ".join(f"{run.workers[w].name}: {text!r}" for w, text in record.texts.items())
        )
    print(
        f"\nworker 1 attends to {len(run.view_token_ids(1))} tokens; model processed {run.forward_tokens} "
        f"tokens in all; KV cache holds {run.cache.tokens_stored} tokens in {run.cache.bytes_used} bytes"
    )


if __name__ == "__main__":
    main()
