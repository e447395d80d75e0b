"""The `hogwild eval` and `hogwild eval-report` subcommands (their options and what they do)."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hogwild_agents.attention import IMPLEMENTATIONS
from hogwild_agents.errors import HogwildError
from hogwild_agents.evaluation.checkers import CHECKERS, DEFAULT_TOLERANCE, make_checker
from hogwild_agents.evaluation.datasets import ANSWER_FIELDS, DEFAULT_GYM_SIZE, QUESTION_FIELDS, load_dataset
from hogwild_agents.evaluation.frame import export
from hogwild_agents.evaluation.grid import BASELINES, NO_PROTOCOL, build_grid, parse_list
from hogwild_agents.evaluation.message_passing import SYNC_EVERY
from hogwild_agents.evaluation.report import summarise, write_report
from hogwild_agents.evaluation.runner import BUDGET_UNITS, EvalSettings, run_eval
from hogwild_agents.evaluation.store import ResultStore
from hogwild_agents.protocol import Protocol

DEFAULT_OUT = "hogwild-eval"
EVAL_HELP = f"""Run a grid of configurations over a dataset and plot accuracy against the budget.

DATASET is a JSONL file, one {{"question": ..., "answer": ...}} object per line (also accepted:
question fields {", ".join(QUESTION_FIELDS[1:])};
answer fields {", ".join(ANSWER_FIELDS[1:])}),
or a reasoning-gym generator such as gym:countdown, gym:basic_arithmetic or gym:gsm_symbolic
(options as gym:countdown?max_numbers=4). Results go to an SQLite database; running the same
command again resumes where it stopped."""


def add_eval_parsers(commands: argparse._SubParsersAction) -> None:
    """Add `eval` and `eval-report` to the `hogwild` command's subparsers."""
    ev = commands.add_parser(
        "eval",
        help="accuracy of N workers vs baselines on a dataset, at several budgets",
        description=EVAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument("dataset", help="a JSONL file, or gym:NAME for a reasoning-gym generator")
    ev.add_argument("--workers", default="1,2,4", help="worker counts to compare (default 1,2,4)")
    ev.add_argument(
        "--protocols",
        default="collaborate",
        help="comma-separated protocols (shipped names or template paths)",
    )
    ev.add_argument(
        "--layouts",
        default="combined",
        help="layouts of the N-worker runs: combined, contiguous (interleaved: message passing)",
    )
    ev.add_argument(
        "--budgets",
        default="256,512,1024",
        help="caps per run, in --budget-unit (default 256,512,1024 forward passes)",
    )
    ev.add_argument(
        "--budget-unit",
        choices=BUDGET_UNITS,
        default="forwards",
        help="forwards: forward passes per run, every method capped alike, the finisher inside the cap "
        "(one x-grid); tokens: tokens each worker writes (default forwards)",
    )
    ev.add_argument(
        "--checkpoints",
        action="store_true",
        help="one run per problem, configuration and seed, capped at the largest budget and read at "
        "each smaller one on its way (the finisher forced on a fork of its cache): the same answers as "
        "separate capped runs, for the cost of the largest",
    )
    ev.add_argument(
        "--baselines",
        default=",".join(BASELINES),
        help="single (one worker), vote (N independent samples, majority vote), msgpass (idealised "
        "message passing: N workers seeing each other's finished steps on the shared cache), reprefill "
        "(message passing in N separate sequences, each re-prefilling the others' text every "
        "--sync-every tokens); comma-separated, or none (default: all)",
    )
    ev.add_argument(
        "--sync-every",
        type=int,
        default=SYNC_EVERY,
        help=f"tokens between the reprefill baseline's syncs (default {SYNC_EVERY})",
    )
    ev.add_argument(
        "--baseline-protocol",
        default=None,
        help="protocol of the baselines (default: the first); none: the plain prompt, no collaboration text",
    )
    ev.add_argument(
        "--checker", choices=CHECKERS, default="auto", help="how answers are scored (default auto)"
    )
    ev.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="relative/absolute tolerance of numeric checks",
    )
    ev.add_argument(
        "--limit", type=int, default=None, help=f"problems, a seeded sample (gym default {DEFAULT_GYM_SIZE})"
    )
    ev.add_argument(
        "--sample-seed", type=int, default=0, help="seed of the problem sample (--limit) (default 0)"
    )
    ev.add_argument(
        "--seeds",
        default="0",
        help="replicate seeds, comma-separated (default 0): each one a full pass over the grid; every "
        "run's sampling seed is a hash of its replicate seed, configuration, vote sample and problem",
    )
    ev.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default 0.6)")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold in (0, 1]")
    ev.add_argument(
        "--interjection-period", type=int, default=None, help="tokens between a protocol's interjections"
    )
    ev.add_argument("--model", default=None, help="model directory, id or .gguf file (default: embedded)")
    ev.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    ev.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    ev.add_argument("--attention", choices=IMPLEMENTATIONS, default="fast", help="attention implementation")
    ev.add_argument("--batch-size", type=int, default=8, help="problems submitted to the engine together")
    ev.add_argument(
        "--out", default=DEFAULT_OUT, help=f"folder for the database and report (default {DEFAULT_OUT})"
    )
    ev.add_argument("--db", default=None, help="results database (default OUT/results.sqlite)")
    ev.add_argument("--question-field", default=None, help="JSONL field holding the question")
    ev.add_argument("--answer-field", default=None, help="JSONL field holding the reference answer")
    ev.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    report = commands.add_parser(
        "eval-report", help="write the report of an eval database, or compare two side by side"
    )
    report.add_argument("db", help="results database of `hogwild eval`")
    report.add_argument(
        "--compare",
        metavar="DB",
        action="append",
        default=[],
        help="another database to compare with (repeatable)",
    )
    report.add_argument(
        "--csv", metavar="FILE", default=None, help="write DB's per-problem rows as CSV instead of a report"
    )
    report.add_argument(
        "--parquet",
        metavar="FILE",
        default=None,
        help="write DB's per-problem rows as Parquet (needs pyarrow) instead of a report",
    )
    report.add_argument(
        "--out",
        default=None,
        help="report folder (default: the database's folder; eval-compare when comparing)",
    )


def eval_command(args: argparse.Namespace) -> int:
    try:
        return _eval(args)
    except HogwildError as err:
        raise SystemExit(f"hogwild eval: {err}") from None
    except KeyboardInterrupt:
        print("\ninterrupted: the rows computed so far are stored; run the same command to resume")
        return 130


def eval_report_command(args: argparse.Namespace) -> int:
    try:
        if args.csv or args.parquet:
            export(args.db, args.csv, args.parquet)
            for path in (args.csv, args.parquet):
                if path:
                    print(f"wrote {path}")
            return 0
        databases = [args.db, *args.compare]
        out = args.out or ("eval-compare" if args.compare else str(Path(args.db).parent))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            page = write_report(databases, out)
        for warning in caught:
            print(f"warning: {warning.message}", file=sys.stderr)
        print(f"wrote {page}")
        return 0
    except HogwildError as err:
        raise SystemExit(f"hogwild eval-report: {err}") from None


def _eval(args: argparse.Namespace) -> int:
    from hogwild_agents.engine import HogwildEngine

    dataset = load_dataset(
        args.dataset,
        limit=args.limit,
        seed=args.sample_seed,
        question_field=args.question_field,
        answer_field=args.answer_field,
    )
    checker = make_checker(args.checker, dataset, args.tolerance)
    protocols = parse_list(args.protocols, "protocols")
    configs = build_grid(
        parse_list(args.workers, "workers", int),
        protocols,
        parse_list(args.layouts, "layouts"),
        parse_list(args.baselines, "baselines"),
        args.baseline_protocol,
    )
    settings = EvalSettings(
        budgets=tuple(parse_list(args.budgets, "budgets", int)),
        seeds=tuple(parse_list(args.seeds, "seeds", int)),
        sample_seed=args.sample_seed,
        dtype=args.dtype or "auto",
        device=args.device or "auto",
        temperature=args.temperature,
        top_p=args.top_p,
        attention=args.attention,
        batch_size=args.batch_size,
        interjection_period=args.interjection_period,
        budget_unit=args.budget_unit,
        sync_every=args.sync_every,
        checkpoints=args.checkpoints,
    )
    settings.check(configs)
    for name in {c.protocol for c in configs}:
        if name.lower() != NO_PROTOCOL:
            Protocol(name)  # a bad protocol fails before the model loads
    out = Path(args.out)
    db = Path(args.db) if args.db else out / "results.sqlite"

    def load():  # called by run_eval once the database has accepted the settings
        return HogwildEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)

    with ResultStore(db) as store:
        rows = run_eval(
            load,
            dataset,
            configs,
            settings,
            store,
            checker,
            model=args.model or "embedded SmolLM2-135M-Instruct",
            progress=not args.quiet,
        )
        _print_summary(rows, store.configs())
    print(f"results: {db}")
    if not args.no_report:
        print(f"report: {write_report([db], out)}")
    return 0


def _print_summary(rows, configs) -> None:
    table = Table(
        "configuration", "budget", "n", "accuracy (Wilson 95%)", "score", "forward passes", "tokens",
        "wall s", "tokens / correct",
    )  # fmt: skip
    for p in summarise(rows, configs):
        table.add_row(
            p.config.label,
            str(p.budget),
            str(p.problems),
            f"{100 * p.accuracy:.1f}% ({100 * p.interval[0]:.0f}-{100 * p.interval[1]:.0f})",
            f"{p.score:.3f}",
            f"{p.forward_passes:.1f}",
            f"{p.tokens:.1f}",
            f"{p.wall_s:.2f}",
            f"{p.per_correct(p.tokens):.0f}",
        )
    console = Console()
    if not console.is_terminal:  # a file or a pipe: no need to fold the table into 80 columns
        console = Console(width=120)
    console.print(table)
