"""The `hogwild` command: run workers on a question and show what each one writes."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from rich.console import Console

from hogwild_agents.attention import IMPLEMENTATIONS
from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.engine import HogwildEngine
from hogwild_agents.live import LiveView
from hogwild_agents.protocol import shipped_protocols
from hogwild_agents.results import (
    RunEvent,
    StepRecord,
    ToolCallEvent,
    ToolResultEvent,
    WorkerStepEvent,
)
from hogwild_agents.run import HogwildRun
from hogwild_agents.transcript import render_html
from hogwild_agents.views import LAYOUTS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hogwild", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run N workers on one question over a shared KV cache")
    run.add_argument("question", help="the task or question for the workers")
    run.add_argument("--workers", type=int, default=2, help="number of parallel workers (default 2)")
    run.add_argument(
        "--protocol",
        default="collaborate",
        help="shipped protocol name, a template file path, or 'none' for raw continuation",
    )
    run.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="combined",
        help="how each worker sees the others' work (default combined)",
    )
    run.add_argument("--max-tokens", type=int, default=256, help="tokens each worker may generate")
    run.add_argument(
        "--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6)"
    )
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    run.add_argument("--model", default=None, help="model directory, id or .gguf file (default: embedded)")
    run.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    run.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    run.add_argument(
        "--tools",
        default="",
        metavar="NAMES",
        help="comma-separated built-in tools the workers may call inside the run: calculator",
    )
    run.add_argument(
        "--attention",
        choices=IMPLEMENTATIONS,
        default="fast",
        help="attention implementation: fast (default), triton (CUDA kernel) or eager (reference)",
    )
    run.add_argument(
        "--compile",
        action="store_true",
        help="compile the decode step (torch.compile; CUDA graphs on a GPU): faster steps after a "
        "one-off compilation per batch shape",
    )
    run.add_argument("--json", action="store_true", help="print the machine-readable result (JSON) instead")
    run.add_argument(
        "--transcript",
        metavar="PATH",
        default=None,
        help="also write a self-contained HTML page of the run to PATH",
    )
    run.add_argument(
        "--view",
        choices=("auto", "live", "plain"),
        default="auto",
        help="live: columns per worker (needs a terminal); plain: streamed text; auto: live on a terminal",
    )
    commands.add_parser("templates", help="list the shipped collaboration protocols")
    bench = commands.add_parser("bench", help="run the benchmark against transformers baselines")
    bench.add_argument(
        "options", nargs=argparse.REMAINDER, help="options passed to `python -m benchmarks.run`"
    )
    return parser


BUILTIN_TOOLS = {"calculator": calculator_tool}


def _engine_tools(names: str) -> list:
    tools = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in BUILTIN_TOOLS:
            raise SystemExit(f"hogwild: unknown tool {name!r}; built-in tools: {', '.join(BUILTIN_TOOLS)}")
        tools.append(BUILTIN_TOOLS[name]())
    return tools


class PlainPrinter:
    """Prints whole steps as they finish, each under its worker's name, and tool calls and results."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, event: RunEvent) -> None:
        if isinstance(event, WorkerStepEvent) and event.text.strip():
            self.out.write(f"[{event.name}] {event.text.strip()}\n\n")
        elif isinstance(event, ToolCallEvent | ToolResultEvent):
            self.out.write(f"[tool] {event.text.strip()}\n\n")
        else:
            return
        self.out.flush()


class LiveController:
    """Draws the live view between steps, in the thread that drives the run (a run controller)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.view: LiveView | None = None

    def start(self, run: HogwildRun) -> None:
        self.view = LiveView(run, self.console)
        self.view.__enter__()
        run.add_listener(self._note)

    def _note(self, event: RunEvent) -> None:
        if isinstance(event, ToolCallEvent):
            self.view.note(f"{event.call.worker_name} calls {event.call.name}: {event.call.raw}")
        elif isinstance(event, ToolResultEvent):
            self.view.note(f"{event.call.name} -> {event.call.result}")

    def after_step(self, run: HogwildRun, record: StepRecord) -> bool:
        self.view.update(record)
        return False

    def finish(self, run: HogwildRun, stopped: bool) -> None:
        self.close()

    def close(self) -> None:
        if self.view is not None:
            self.view.__exit__(None, None, None)
            self.view = None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "templates":
        for name, description in shipped_protocols().items():
            print(f"{name:20s} {description}")
        return 0
    if args.command == "bench":
        from benchmarks.run import main as bench_main

        bench_main(args.options)
        return 0
    tools = _engine_tools(args.tools)
    engine = HogwildEngine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, compile=args.compile
    )
    protocol = None if args.protocol.lower() == "none" else args.protocol
    options = dict(
        n_workers=args.workers,
        layout=args.layout,
        protocol=protocol,
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        engine_tools=tools or None,
        attention=args.attention,
    )
    messages = [{"role": "user", "content": args.question}]
    if args.json:
        result = engine.generate(messages, **options)
        if args.transcript:
            Path(args.transcript).write_text(render_html(result, title=args.question), encoding="utf-8")
        print(json.dumps(asdict(result), indent=2))
        return 0
    console = Console()
    live = args.view == "live" or (args.view == "auto" and console.is_terminal)
    controller = LiveController(console) if live else None
    handle = engine.submit(messages, controller=controller, **options)
    try:
        if controller is None:
            printer = PlainPrinter(sys.stdout)
            for event in handle.events():
                printer(event)
        result = handle.result()
    finally:
        handle.cancel()  # Ctrl-C: stop the run
        if controller is not None:
            controller.close()
    if args.transcript:
        Path(args.transcript).write_text(render_html(result, title=args.question), encoding="utf-8")
    usage = result.usage
    print(f"\n\n=== Final answer ===\n{result.final_text.strip()}")
    print(
        f"\n[{len(result.workers)} workers, {result.steps} steps; prompt {usage.prompt_tokens} tokens, "
        f"generated {usage.generated_tokens}, model processed {usage.forward_tokens}]"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
