"""Two collaboration protocols side by side on the embedded default model; prints both transcripts.

Run: .venv/bin/python examples/protocols.py [--max-tokens N]
"""

from __future__ import annotations

import argparse

from hogwild_agents import HogwildEngine
from hogwild_agents.protocol import Protocol

TASK = "A train leaves at 9:40 and the trip takes 2 hours 35 minutes. When does it arrive?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=80)
    args = parser.parse_args()

    engine = HogwildEngine.from_pretrained()
    protocols = {
        "collaborate": Protocol("collaborate"),
        "check_redundancy": Protocol("check_redundancy", interjection_period=max(8, args.max_tokens // 3)),
    }
    for name, protocol in protocols.items():
        result = engine.generate(TASK, n_workers=2, protocol=protocol, max_new_tokens=args.max_tokens)
        print(f"################ {name} ################")
        for worker in result.workers:
            print(f"--- {worker.name} ({worker.finish_reason})\n{worker.text.strip()}\n")
        print(f"shared history:\n{result.shared_text[-600:].strip()}\n")
        print(f"final answer: {result.final_text!r}\n")


if __name__ == "__main__":
    main()
