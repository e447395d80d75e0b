"""The `hogwild` command: run workers on a question and show what each one writes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TextIO

from rich.console import Console

from hogwild_agents import validation
from hogwild_agents.attention import IMPLEMENTATIONS
from hogwild_agents.builtin_tools import calculator_tool
from hogwild_agents.engine import MAX_WORKERS, HogwildEngine
from hogwild_agents.errors import HogwildError
from hogwild_agents.evaluation.command import add_eval_parsers, eval_command, eval_report_command
from hogwild_agents.live import LiveView
from hogwild_agents.loading import check_model_reference, resolve_device, resolve_dtype
from hogwild_agents.protocol import Protocol, shipped_protocols
from hogwild_agents.results import (
    HogwildResult,
    RunEvent,
    StepRecord,
    ToolCallEvent,
    ToolResultEvent,
    WorkerStepEvent,
)
from hogwild_agents.run import HogwildRun
from hogwild_agents.sampling import SamplingParams
from hogwild_agents.server.config import DEFAULT_MODEL_NAME
from hogwild_agents.transcript import render_html
from hogwild_agents.views import LAYOUTS


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line: `hogwild: error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"hogwild: error: {message} (see `{self.prog} --help`)\n")


def _option_type(convert: Callable[[str], Any], check: Callable[[Any], Any]) -> Callable[[str], Any]:
    """An argparse type: `convert` the text, then `check` it (an InvalidArgumentError is a usage error)."""

    def parse(text: str) -> Any:
        try:
            return check(convert(text))
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).rstrip(".")) from None

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _positive_int(name: str, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= 1 (and <= `maximum`), named `name` in its error."""
    return _option_type(int, lambda n: validation.positive_integer(n, name, maximum))


def _top_p(value: float) -> float:
    return SamplingParams(top_p=value).top_p


def _temperature(value: float) -> float:
    return SamplingParams(temperature=value).temperature


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hogwild", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run N workers on one question over a shared KV cache")
    run.add_argument("question", help="the task or question for the workers")
    run.add_argument(
        "--workers",
        type=_positive_int("workers", MAX_WORKERS),
        default=2,
        help=f"number of parallel workers, 1 to {MAX_WORKERS} (default 2)",
    )
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
    run.add_argument(
        "--max-tokens",
        type=_positive_int("max-tokens"),
        default=256,
        help="tokens each worker may generate",
    )
    run.add_argument(
        "--temperature",
        type=_option_type(float, _temperature),
        default=0.6,
        help="sampling temperature; 0 = greedy (default 0.6)",
    )
    run.add_argument(
        "--top-p", type=_option_type(float, _top_p), default=1.0, help="nucleus sampling threshold in (0, 1]"
    )
    run.add_argument(
        "--seed", type=_option_type(int, validation.seed), default=None, help="random seed for sampling"
    )
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
    run.add_argument(
        "--json",
        nargs="?",
        const=STDOUT,
        default=None,
        metavar="PATH",
        help="the machine-readable result (JSON): alone, printed instead of the view; with a PATH, also "
        "written to that file (give the question first, or write --json=PATH)",
    )
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
    _add_serve_parser(commands)
    bench = commands.add_parser("bench", help="run the benchmark against transformers baselines")
    bench.add_argument(
        "options", nargs=argparse.REMAINDER, help="options passed to `python -m benchmarks.run`"
    )
    add_eval_parsers(commands)
    return parser


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions)",
        description="An OpenAI-compatible server: /v1/chat/completions (streaming and not), /v1/models, "
        "/health. Requests may set the extra body fields n_workers, protocol and layout; the options "
        "below are their defaults. Needs the serve extra: pip install 'hogwild-agents[serve]'.",
    )
    serve.add_argument(
        "model", nargs="?", default=None, help="model directory, id or .gguf file (default: embedded)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port",
        type=_option_type(int, lambda n: validation.integer(n, "port", 0, 65535)),
        default=8000,
        help="port to listen on (default 8000)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("HOGWILD_API_KEY"),
        help="require `Authorization: Bearer KEY` on /v1 routes (default: $HOGWILD_API_KEY; none: open)",
    )
    serve.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL)")
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    serve.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    serve.add_argument(
        "--workers",
        type=_positive_int("workers", MAX_WORKERS),
        default=2,
        help="default workers per request (default 2)",
    )
    serve.add_argument(
        "--protocol",
        default="collaborate",
        help="default protocol: a shipped name, a template file, or 'none' (default collaborate)",
    )
    serve.add_argument(
        "--layout", choices=LAYOUTS, default="combined", help="default layout (default combined)"
    )
    serve.add_argument(
        "--max-tokens",
        type=_positive_int("max-tokens"),
        default=256,
        help="default tokens per worker (default 256)",
    )
    serve.add_argument(
        "--temperature",
        type=_option_type(float, _temperature),
        default=0.6,
        help="default temperature (default 0.6)",
    )
    serve.add_argument(
        "--top-p",
        type=_option_type(float, _top_p),
        default=1.0,
        help="default nucleus threshold (default 1.0)",
    )
    serve.add_argument(
        "--max-tokens-limit",
        type=_positive_int("max-tokens-limit"),
        default=4096,
        help="largest max_tokens a request may ask (default 4096)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive_int("max-request-bytes"),
        default=1_000_000,
        help="largest request body (default 1000000)",
    )
    serve.add_argument(
        "--request-timeout",
        type=_option_type(float, lambda t: validation.timeout(t, "request-timeout")),
        default=None,
        help="seconds one request's run may take (default: none)",
    )
    serve.add_argument("--ray", action="store_true", help="serve replicas on Ray Serve, one engine each")
    serve.add_argument(
        "--replicas",
        type=_positive_int("replicas"),
        default=1,
        help="with --ray: number of replicas (default 1)",
    )
    serve.add_argument(
        "--ray-address",
        default=None,
        help="with --ray: the cluster to join (default: $RAY_ADDRESS or a local one)",
    )


def _serve(args: argparse.Namespace) -> int:
    try:
        from hogwild_agents.server.config import ServerConfig

        config = ServerConfig(
            model_name=args.served_model_name or args.model or DEFAULT_MODEL_NAME,
            n_workers=args.workers,
            protocol=None if args.protocol.lower() == "none" else args.protocol,
            layout=args.layout,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            max_tokens_limit=args.max_tokens_limit,
            max_request_bytes=args.max_request_bytes,
            timeout_s=args.request_timeout,
            api_key=args.api_key or None,
        )
    except ValueError as error:
        raise CommandError(f"serve: {error}") from None
    try:
        if args.ray:
            from hogwild_agents.server import ray_app
        else:
            import uvicorn

            from hogwild_agents.server.app import create_app
    except ImportError as error:
        raise CommandError(
            f"serve: {error.name or error} is not installed; install the serve extra: "
            "pip install 'hogwild-agents[serve]'"
        ) from None
    if args.ray:  # the replicas load the model (on their own nodes) and check these there
        settings = {f: getattr(config, f) for f in ServerConfig.__dataclass_fields__}
        settings["protocol"] = settings["protocol"] or "none"
        options = dict(model=args.model, device=args.device, dtype=args.dtype, replicas=args.replicas)
        ray_app.run(ray_app.AppArgs(**options, **settings), args.host, args.port, args.ray_address)
        return 0
    resolve_dtype(args.dtype, resolve_device(args.device))
    check_model_reference(args.model)
    engine = HogwildEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    uvicorn.run(create_app(engine, config), host=args.host, port=args.port)
    return 0


BUILTIN_TOOLS = {"calculator": calculator_tool}
STDOUT = "-"


class CommandError(Exception):
    """A problem the command reports as one line (`hogwild: error: ...`) with a non-zero exit code."""


def _engine_tools(names: str) -> list:
    tools = []
    for name in filter(None, (n.strip() for n in names.split(","))):
        if name not in BUILTIN_TOOLS:
            raise CommandError(f"unknown tool {name!r}; built-in tools: {', '.join(BUILTIN_TOOLS)}")
        tools.append(BUILTIN_TOOLS[name]())
    return tools


def _check_output(path: str | None, option: str) -> None:
    """Refuse, before any work, an output path that cannot be written: a directory, a file in a missing
    directory, or a place without write permission."""
    if path is None or path == STDOUT:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise CommandError(f"{option} {path!r} is a directory; give a file path such as {path}/run.out")
    if not folder.is_dir():
        raise CommandError(
            f"{option} {path!r}: the directory {str(folder)!r} does not exist; create it first"
        )
    if not os.access(target if target.exists() else folder, os.W_OK):
        raise CommandError(f"{option} {path!r} cannot be written (permission denied)")


def _protocol(name: str) -> Protocol | None:
    """The protocol named on the command line (checked before the model loads); None for 'none'."""
    return None if name.lower() == "none" else Protocol(name)


def _write_outputs(result: HogwildResult, args: argparse.Namespace) -> int:
    """Write the transcript and the JSON file (after the result was printed); 1 if one cannot be written."""
    outputs = [(args.transcript, "--transcript", lambda: render_html(result, title=args.question))]
    if args.json not in (None, STDOUT):
        outputs.append((args.json, "--json", lambda: json.dumps(asdict(result), indent=2)))
    code = 0
    for path, option, render in outputs:
        if path is None:
            continue
        try:
            Path(path).write_text(render(), encoding="utf-8")
        except OSError as error:
            _report_error(
                f"{option}: could not write {path!r} ({error.strerror or error}); the result is printed above"
            )
            code = 1
    return code


def _report_error(message: str) -> int:
    print(f"hogwild: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


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
    """Run the command; errors are one-line messages on stderr with a non-zero exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except (CommandError, HogwildError, ValueError, OSError) as error:
        return _report_error(str(error))
    except KeyboardInterrupt:
        return _report_error("interrupted") + 128


def _command(args: argparse.Namespace) -> int:
    if args.command == "templates":
        for name, description in shipped_protocols().items():
            print(f"{name:20s} {description}")
        return 0
    if args.command == "bench":
        from benchmarks.run import main as bench_main

        bench_main(args.options)
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "eval":
        return eval_command(args)
    if args.command == "eval-report":
        return eval_report_command(args)
    tools = _engine_tools(args.tools)  # everything the command line names is checked before the model loads
    _check_output(args.transcript, "--transcript")
    _check_output(args.json, "--json")
    protocol = _protocol(args.protocol)
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    check_model_reference(args.model)
    engine = HogwildEngine.from_pretrained(
        args.model, device=args.device, dtype=args.dtype, compile=args.compile
    )
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
    if args.json == STDOUT:
        result = engine.generate(messages, **options)
        print(json.dumps(asdict(result), indent=2))
        return _write_outputs(result, args)
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
    usage = result.usage
    print(f"\n\n=== Final answer ===\n{result.final_text.strip()}")
    print(
        f"\n[{len(result.workers)} workers, {result.steps} steps; prompt {usage.prompt_tokens} tokens, "
        f"generated {usage.generated_tokens}, model processed {usage.forward_tokens}]"
    )
    return _write_outputs(result, args)


if __name__ == "__main__":
    raise SystemExit(main())
