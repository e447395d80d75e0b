"""Three workers answer one question over a shared KV cache, on the embedded default model.

Run: .venv/bin/python examples/quickstart.py [--max-tokens N]
"""

from __future__ import annotations

import argparse

from hogwild_agents import HogwildEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()

    engine = HogwildEngine.from_pretrained()
    result = engine.generate(
        [{"role": "user", "content": "Give two reasons why the sky is blue."}],
        n_workers=3,
        max_new_tokens=args.max_tokens,
        temperature=0.7,
        seed=0,
    )
    for worker in result.workers:
        print(
            f"--- {worker.name} ({worker.finish_reason}, {worker.generated_tokens} tokens)\n{worker.text}\n"
        )
    print("=== final ===\n" + result.final_text)
    print(f"usage: {result.usage}")


if __name__ == "__main__":
    main()
