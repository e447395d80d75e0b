"""The eval loop: every problem x configuration x budget, many problems per engine call, resumable.

Each budget is its own run with `max_new_tokens=budget` (every worker writes at most `budget` tokens);
when it ends without an answer the protocol's finisher makes one worker answer ("answer if stopped
now", as in the paper). The answer is the protocol's final-answer extraction (`HogwildResult.answer`).
Runs are stored as they finish and rows as soon as their runs are in, so an interrupted eval resumes
where it stopped: rows already present are skipped, runs already present are reused.
"""

from __future__ import annotations

import html
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation.checkers import Checker, majority
from hogwild_agents.evaluation.datasets import Dataset, Problem
from hogwild_agents.evaluation.grid import Config, RunSpec
from hogwild_agents.evaluation.store import ResultRow, ResultStore, RunRecord
from hogwild_agents.protocol import Protocol
from hogwild_agents.results import HogwildResult
from hogwild_agents.transcript import render_html


@dataclass(frozen=True)
class EvalSettings:
    """How runs are made. `batch_size`: problems submitted together (and rows per progress chunk)."""

    budgets: tuple[int, ...]
    seed: int = 0
    temperature: float = 0.6
    top_p: float = 1.0
    attention: str = "fast"
    batch_size: int = 8
    interjection_period: int | None = None

    def check(self, configs: Sequence[Config]) -> None:
        if not self.budgets or any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise EvalError(f"--budgets must list positive token budgets, got {list(self.budgets)}.")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.interjection_period is not None and self.interjection_period < 1:
            raise EvalError(f"--interjection-period must be at least 1, got {self.interjection_period}.")
        if self.temperature <= 0 and any(c.method == "vote" for c in configs):
            raise EvalError(
                "A vote needs different samples: give --temperature > 0, or drop the vote baseline "
                "(--baselines single,msgpass)."
            )


def generate_many(engine: Any, prompts: Sequence[Any], **options: Any) -> list[tuple[HogwildResult, float]]:
    """Run every prompt with the same options; returns (result, wall seconds) per prompt.

    Uses `engine.generate_many` when the engine has it (the runs share forward passes; each run's wall
    time is the call's time divided among them), else `engine.generate` one prompt after another."""
    many = getattr(engine, "generate_many", None)
    if many is not None:
        start = time.perf_counter()
        results = many(list(prompts), **options)
        share = (time.perf_counter() - start) / max(len(prompts), 1)
        return [(result, share) for result in results]
    timed = []
    for prompt in prompts:
        start = time.perf_counter()
        result = engine.generate(prompt, **options)
        timed.append((result, time.perf_counter() - start))
    return timed


def eval_meta(dataset: Dataset, settings: EvalSettings, checker: Checker, model: str) -> dict[str, str]:
    """What every stored row depends on; a resumed eval must match it."""
    meta = {
        "dataset": dataset.name,
        "seed": settings.seed,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "checker": checker.kind,
        "tolerance": checker.tolerance,
        "model": model,
    }
    if settings.interjection_period is not None:
        meta["interjection_period"] = settings.interjection_period
    return {key: str(value) for key, value in meta.items()}


def run_eval(
    engine: Any,
    dataset: Dataset,
    configs: Sequence[Config],
    settings: EvalSettings,
    store: ResultStore,
    checker: Checker,
    *,
    model: str | None = None,
    progress: bool = True,
    on_row: Callable[[ResultRow], None] | None = None,
) -> list[ResultRow]:
    """Compute every missing row of the grid into `store`; returns all the store's rows.

    `model` names the model in the database (default: the engine's model path); `on_row` is called
    after each row is stored."""
    settings.check(configs)
    protocol_options = {}
    if settings.interjection_period is not None:
        protocol_options["interjection_period"] = settings.interjection_period
    protocols = {
        name: Protocol(name, **protocol_options) for name in dict.fromkeys(c.protocol for c in configs)
    }
    model = model or str(getattr(engine.model, "name_or_path", "") or type(engine.model).__name__)
    store.ensure_meta(eval_meta(dataset, settings, checker, model))
    store.add_problems(dataset.problems)
    store.add_configs(configs)

    done = store.result_keys()
    todo = [
        (problem, config, budget)
        for problem in dataset.problems
        for config in configs
        for budget in settings.budgets
        if (problem.id, config.name, budget) not in done
    ]
    have = store.run_keys()
    needed = {
        (p.id, spec): None for p, c, b in todo for spec in c.runs(b) if (p.id, spec) not in have
    }  # an ordered set
    work = _Work(engine, store, checker, protocols, settings, on_row)
    with _progress(progress) as bar:
        task = bar.add_task("eval", total=sum(spec.budget for _, spec in needed) or 1, rows="")
        work.report = lambda text: bar.update(task, rows=f"{work.rows}/{len(todo)} rows", description=text)
        work.advance = lambda amount: bar.advance(task, amount)
        work.report("starting")
        for chunk in _chunks(todo, settings.batch_size):
            work.do_chunk(chunk, have)
        work.report("done")
        bar.update(task, completed=bar.tasks[0].total)
    return store.results()


class _Work:
    """The state of one `run_eval`: runs the chunks, stores runs and rows, reports progress."""

    def __init__(
        self,
        engine: Any,
        store: ResultStore,
        checker: Checker,
        protocols: dict[str, Protocol],
        settings: EvalSettings,
        on_row: Callable[[ResultRow], None] | None,
    ) -> None:
        self.engine, self.store, self.checker = engine, store, checker
        self.protocols, self.settings, self.on_row = protocols, settings, on_row
        self.rows = 0
        self.report: Callable[[str], None] = lambda text: None
        self.advance: Callable[[int], None] = lambda amount: None

    def do_chunk(self, chunk: list[tuple[Problem, Config, int]], have: set[tuple[str, RunSpec]]) -> None:
        """All runs the chunk's rows need, one engine call per RunSpec, storing rows once complete."""
        by_spec: dict[RunSpec, list[Problem]] = {}
        for problem, config, budget in chunk:
            for spec in config.runs(budget):
                if (problem.id, spec) not in have and problem not in by_spec.setdefault(spec, []):
                    by_spec[spec].append(problem)
        pending = list(chunk)
        for spec, spec_problems in by_spec.items():
            self.report(_describe(spec))
            prompts = [[{"role": "user", "content": p.question}] for p in spec_problems]
            for problem, (result, wall_s) in zip(
                spec_problems, generate_many(self.engine, prompts, **self._options(spec)), strict=True
            ):
                self._store_run(problem, spec, result, wall_s)
                have.add((problem.id, spec))
                self.advance(spec.budget)
            pending = self._store_rows(pending, have)
        self._store_rows(pending, have)

    def _options(self, spec: RunSpec) -> dict[str, Any]:
        return dict(
            n_workers=spec.n_workers,
            layout=spec.layout,
            protocol=self.protocols[spec.protocol],
            max_new_tokens=spec.budget,
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            seed=self.settings.seed + spec.seed_offset,
            attention=self.settings.attention,
        )

    def _store_run(self, problem: Problem, spec: RunSpec, result: HogwildResult, wall_s: float) -> None:
        record = RunRecord(
            problem=problem.id,
            spec=spec,
            answer=result.answer,
            generated_tokens=result.usage.generated_tokens,
            steps=result.steps,
            forward_tokens=result.usage.forward_tokens,
            wall_s=wall_s,
            finish_reason=result.finish_reason,
        )
        self.store.add_run(record, transcript_page(problem, spec, result))

    def _store_rows(
        self, pending: list[tuple[Problem, Config, int]], have: set[tuple[str, RunSpec]]
    ) -> list[tuple[Problem, Config, int]]:
        """Store the rows whose runs are all in; returns the others."""
        left = []
        for problem, config, budget in pending:
            specs = config.runs(budget)
            if any((problem.id, spec) not in have for spec in specs):
                left.append((problem, config, budget))
                continue
            row = make_row(
                problem, config, budget, [self.store.run(problem.id, s) for s in specs], self.checker
            )
            self.store.add_result(row)
            self.rows += 1
            self.report(_describe(specs[-1]))
            if self.on_row is not None:
                self.on_row(row)
        return left


def make_row(
    problem: Problem, config: Config, budget: int, runs: Sequence[RunRecord], checker: Checker
) -> ResultRow:
    """The row of `problem` x `config` x `budget` from its runs (a vote's majority over its samples)."""
    samples = tuple(run.answer for run in runs)
    answer = majority(samples, checker, problem) if config.method == "vote" else samples[0]
    score = checker.score(answer, problem)
    return ResultRow(
        problem=problem.id,
        config=config.name,
        budget=budget,
        answer=answer,
        correct=score >= 1.0,
        score=score,
        samples=samples,
        tokens=sum(run.generated_tokens for run in runs),
        forward_passes=max(run.steps for run in runs),
        forward_tokens=sum(run.forward_tokens for run in runs),
        wall_s=sum(run.wall_s for run in runs),
        finish_reason=",".join(sorted({run.finish_reason for run in runs})),
    )


def transcript_page(problem: Problem, spec: RunSpec, result: HogwildResult) -> str:
    """The run's HTML transcript (transcript.render_html) headed by the problem and its answers."""
    esc = html.escape
    title = f"Problem {problem.id} \u00b7 {_describe(spec)}"
    head = (
        '<div class="problem"><h2>Problem</h2>'
        f'<div class="timeline">{esc(problem.question)}</div>'
        f'<p class="meta">reference answer: <b>{esc(problem.answer)}</b> &middot; extracted answer: '
        f"<b>{esc(str(result.answer))}</b></p></div>"
    )
    page = render_html(result, title=title)
    return page.replace("<h2>Final answer</h2>", head + "\n<h2>Final answer</h2>", 1)


def _describe(spec: RunSpec) -> str:
    workers = "1 worker" if spec.n_workers == 1 else f"{spec.n_workers} workers, {spec.layout}"
    seed = f", seed +{spec.seed_offset}" if spec.seed_offset else ""
    return f"{workers}, {spec.protocol}, budget {spec.budget}{seed}"


def _chunks(todo: list[tuple[Problem, Config, int]], size: int) -> list[list[tuple[Problem, Config, int]]]:
    """The rows grouped by problem, `size` problems per chunk, in dataset order."""
    order = list(dict.fromkeys(problem.id for problem, _, _ in todo))
    chunk_of = {problem_id: i // size for i, problem_id in enumerate(order)}
    chunks: list[list[tuple[Problem, Config, int]]] = [[] for _ in range((len(order) + size - 1) // size)]
    for row in todo:
        chunks[chunk_of[row[0].id]].append(row)
    return chunks


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
    )
