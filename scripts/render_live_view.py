"""Render the CLI's live view of a short run to docs/live_view.svg (the picture in the README).

Run: .venv/bin/python scripts/render_live_view.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

from hogwild_agents import HogwildEngine
from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.live import LiveView
from hogwild_agents.results import RunEvent, ToolCallEvent, ToolResultEvent

QUESTION = "A shop sells pens at 3 for $2. How much do 12 pens cost?"


def note_tool(view: LiveView, event: RunEvent) -> None:
    if isinstance(event, ToolCallEvent):
        view.note(f"{event.call.worker_name} calls {event.call.name}: {event.call.raw}")
    elif isinstance(event, ToolResultEvent):
        view.note(f"{event.call.name} -> {event.call.result}")


def main() -> None:
    engine = HogwildEngine.from_pretrained()
    run = engine.start(
        QUESTION,
        n_workers=3,
        protocol="collaborate",
        max_new_tokens=70,
        temperature=0.7,
        seed=3,
        engine_tools=[calculator_tool()],
    )
    with LiveView(run, Console(width=140)) as view:
        run.add_listener(lambda event: note_tool(view, event))
        for step in range(45):
            if step == 20:
                call = {"name": "calculator", "arguments": {"expression": "12 / 3 * 2"}}
                run.force(2, f"<tool_call>{json.dumps(call)}</tool_call>")
            view.update(run.step())
    picture = Console(record=True, width=140, force_terminal=True, file=open(os.devnull, "w"))  # noqa: SIM115
    picture.print(view.render())
    out = Path(__file__).resolve().parent.parent / "docs" / "live_view.svg"
    picture.save_svg(str(out), title="hogwild run")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
