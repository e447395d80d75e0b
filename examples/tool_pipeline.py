"""Three workers with a calculator and a small local document search, run inside the engine.

Every tool result becomes a shared block that all workers see on the next step. Prints who called what.
Run: .venv/bin/python examples/tool_pipeline.py [--max-tokens N]
"""

from __future__ import annotations

import argparse

from hogwild_agents import HogwildEngine
from hogwild_agents.builtin_tools import calculator_tool, document_search_tool
from hogwild_agents.hooks import Hooks

DOCUMENTS = {
    "Eiffel Tower": "The Eiffel Tower in Paris is 330 metres tall and was completed in 1889.",
    "Statue of Liberty": "The Statue of Liberty in New York is 93 metres tall including its pedestal.",
    "Big Ben": "The Elizabeth Tower (Big Ben) in London is 96 metres tall.",
}
TASK = "How many metres taller is the Eiffel Tower than the Statue of Liberty? Look the heights up."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=120)
    args = parser.parse_args()

    engine = HogwildEngine.from_pretrained()
    hooks = Hooks(
        on_tool_call=lambda call: print(f"[{call.worker_name} calls {call.name}] {call.raw}"),
        on_tool_result=lambda call: print(f"[{call.name} -> {call.worker_name}] {call.result}"),
    )
    run = engine.start(
        TASK,
        n_workers=3,
        protocol="collaborate",
        max_new_tokens=args.max_tokens,
        temperature=0.6,
        seed=1,
        engine_tools=[calculator_tool(), document_search_tool(DOCUMENTS)],
        hooks=hooks,
    )
    run.step()
    # show the mechanism deterministically: Bob looks something up first (the small model rarely calls tools)
    run.force(
        1,
        '<tool_call>{"name": "search_documents", "arguments": {"query": "Eiffel Tower height"}}</tool_call>',
    )
    while not run.done:
        run.step()
    run.conclude()
    result = run.result()
    for worker in result.workers:
        print(f"--- {worker.name} ({worker.finish_reason})\n{worker.text.strip()}\n")
    print("tool calls:", [(c.worker_name, c.name, c.result[:40]) for c in run.tool_calls])
    print("final answer:", result.final_text)
    run.tool_runner.close()


if __name__ == "__main__":
    main()
