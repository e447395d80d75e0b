"""The eval loop: every problem x configuration x budget x replicate seed, many problems per engine
call, resumable.

Each budget is its own run (or, with `checkpoints`, one run per problem, configuration and seed is read
at every budget on its way: `HogwildRun.answer_at` on a fork of its cache) capped at `budget` forward
passes (`max_forward_passes`: every forward after the prompt counts, headers, interjections, re-prefills
and the finisher's answer included), so every method lands on one x-grid; with `budget_unit="tokens"`
the cap is instead the tokens each worker writes (`max_new_tokens`). When a run ends without an answer
the protocol's finisher makes one worker answer ("answer if stopped now", as in the paper), inside the
cap. The answer is the protocol's final-answer extraction (`HogwildResult.answer`). Runs are stored as
they finish and rows as soon as their runs are in, so an interrupted eval resumes where it stopped: rows
already present are skipped, runs already present are reused. The settings every row depends on are
checked against the database before the engine is loaded (`engine` may be a loader: a callable without
`generate`, called only once the check has passed).

Wall time is measured per run, from its own start to its own end inside the batch (engines with
`submit`); a vote's samples run side by side, so a vote counts the forward passes AND the wall time of
its longest sample (its latency), and the tokens of all its samples (its cost).
"""

from __future__ import annotations

import hashlib
import html
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
from hogwild_agents.evaluation.grid import NO_PROTOCOL, REPREFILL_LAYOUT, Config, RunSpec
from hogwild_agents.evaluation.message_passing import SYNC_EVERY, run_reprefill
from hogwild_agents.evaluation.store import ResultRow, ResultStore, RunRecord
from hogwild_agents.protocol import Protocol
from hogwild_agents.results import HogwildResult
from hogwild_agents.run import MIN_FORWARD_PASSES
from hogwild_agents.transcript import render_html

BUDGET_UNITS = ("forwards", "tokens")


@dataclass(frozen=True)
class EvalSettings:
    """How runs are made. `budgets`: caps in `budget_unit` ("forwards": forward passes per run;
    "tokens": tokens per worker). `sync_every`: tokens between the re-prefill baseline's syncs.
    `batch_size`: problems submitted together (and rows per progress chunk)."""

    budgets: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)  # replicate seeds (each one a full pass over the grid)
    temperature: float = 0.6
    top_p: float = 1.0
    attention: str = "fast"
    batch_size: int = 8
    interjection_period: int | None = None
    sample_seed: int = 0  # the seed of the problem sample (recorded; the dataset is sampled with it)
    dtype: str = "auto"  # recorded: what the engine was loaded with
    device: str = "auto"
    budget_unit: str = "forwards"
    sync_every: int = SYNC_EVERY
    checkpoints: bool = False  # one run per (problem, configuration, seed), read at every budget

    def check(self, configs: Sequence[Config]) -> None:
        if self.budget_unit not in BUDGET_UNITS:
            units = ", ".join(BUDGET_UNITS)
            raise EvalError(f"--budget-unit must be one of {units}, got {self.budget_unit!r}.")
        least = MIN_FORWARD_PASSES if self.budget_unit == "forwards" else 1
        if not self.budgets or any(not isinstance(b, int) or b < least for b in self.budgets):
            raise EvalError(
                f"--budgets must list {self.budget_unit} per run, each at least {least}, "
                f"got {list(self.budgets)}."
            )
        if self.sync_every < 1:
            raise EvalError(f"--sync-every must be at least 1, got {self.sync_every}.")
        if self.checkpoints and self.budget_unit != "forwards":
            raise EvalError("--checkpoints reads forward-pass budgets; drop --budget-unit tokens or it.")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvalError(f"--seeds must list distinct replicate seeds, got {list(self.seeds)}.")
        if self.batch_size < 1:
            raise EvalError(f"--batch-size must be at least 1, got {self.batch_size}.")
        if self.interjection_period is not None and self.interjection_period < 1:
            raise EvalError(f"--interjection-period must be at least 1, got {self.interjection_period}.")
        if self.temperature <= 0 and any(c.method == "vote" for c in configs):
            raise EvalError(
                "A vote needs different samples: give --temperature > 0, or drop the vote baseline "
                "(--baselines single,msgpass)."
            )


class ForkTime:
    """Seconds the batch's checkpoint forks have taken so far: a fork runs alone in the driver thread
    and stalls every run of the batch, so the runs' wall times leave it out."""

    def __init__(self) -> None:
        self.total = 0.0


class _Clock:
    """A run controller that records when its run starts and ends, less the checkpoint forks' time
    (of any run of the batch) in between."""

    def __init__(self, forks: ForkTime | None = None) -> None:
        self.forks = forks or ForkTime()
        self.started: float | None = None
        self.ended: float | None = None
        self._forks_at_start = 0.0
        self._forks_at_end: float | None = None

    def start(self, run: Any) -> None:
        self.started = time.perf_counter()
        self._forks_at_start = self.forks.total

    def after_step(self, run: Any, record: Any) -> bool:
        return False

    def finish(self, run: Any, stopped: bool) -> None:
        self.ended = time.perf_counter()
        self._forks_at_end = self.forks.total

    def elapsed(self, now: float, queued: float) -> float:
        """Wall seconds from the run's start to its end (or `now`), checkpoint forks left out."""
        until = self.forks.total if self._forks_at_end is None else self._forks_at_end
        forks = until - self._forks_at_start
        return (self.ended or now) - (self.started or queued) - forks


class _Checkpoints(_Clock):
    """A clock that also reads the run's answer at each smaller forward-pass budget on its way
    (`HogwildRun.answer_at` on a fork, at the step where a run with that cap would stop). A budget's
    wall time is the run's own time up to there plus its fork's."""

    def __init__(self, budgets: Sequence[int], forks: ForkTime) -> None:
        super().__init__(forks)
        self.pending = sorted(budgets)
        self.results: dict[int, tuple[HogwildResult, float]] = {}

    def after_step(self, run: Any, record: Any) -> bool:
        for budget in [b for b in self.pending if run.stops_at(b)]:
            self.pending.remove(budget)
            before = time.perf_counter()
            so_far = self.elapsed(before, before)
            result = run.answer_at(budget)
            fork_s = time.perf_counter() - before
            self.forks.total += fork_s
            self.results[budget] = (result, so_far + fork_s)
        return False


def run_batch(
    engine: Any, jobs: Sequence[tuple[Any, dict[str, Any]]], clocks: Sequence[_Clock] | None = None
) -> list[tuple[HogwildResult, float]]:
    """Run every (prompt, options) job; returns (result, wall seconds) per job, in order.

    With `engine.submit` every job is queued at once (their forwards shared) and each one's wall time
    runs from its own start to its own end (`clocks`: the controllers that time them, one per job);
    else `engine.generate` runs them one after another."""
    submit = getattr(engine, "submit", None)
    if clocks is not None and submit is None:
        raise EvalError("Checkpointed budgets need an engine with `submit` (a HogwildEngine).")
    if submit is not None:
        clocks = list(clocks) if clocks is not None else [_Clock() for _ in jobs]
        queued = time.perf_counter()
        handles = [
            submit(prompt, controller=clock, **options)
            for (prompt, options), clock in zip(jobs, clocks, strict=True)
        ]
        try:
            results = [handle.result() for handle in handles]
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
        now = time.perf_counter()
        return [(result, clock.elapsed(now, queued)) for result, clock in zip(results, clocks, strict=True)]
    timed = []
    for prompt, options in jobs:
        start = time.perf_counter()
        result = engine.generate(prompt, **options)
        timed.append((result, time.perf_counter() - start))
    return timed


def protocol_fingerprint(protocol: Protocol | None) -> str:
    """A hash of what the protocol renders (every block, for 1 and 2 workers in every layout) and of its
    options: the same template text gives the same fingerprint wherever it lives; an edit changes it."""
    if protocol is None:
        return hashlib.sha256(NO_PROTOCOL.encode()).hexdigest()
    from hogwild_agents.views import LAYOUTS

    parts = [
        repr(
            (
                protocol.interjection_period,
                protocol.worker_names,
                protocol.answer_format,
                protocol.reasoning,
                sorted(protocol.variables.items())
                if isinstance(protocol.variables, dict)
                else protocol.variables,
                protocol.strategies,
                protocol.examples,
            )
        )
    ]
    for layout in LAYOUTS:
        for n_workers in (1, 2):
            script = protocol.render(None, "A task.", n_workers, layout)
            parts.append(repr(script))
            parts.append(repr([script.step_header(w, k) for w in range(n_workers) for k in (1, 2)]))
    text = re.sub(r" at 0x[0-9a-f]+", "", "\n".join(parts))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_protocols(
    configs: Sequence[Config], options: dict[str, Any]
) -> tuple[list[Config], dict[tuple[str, str], Protocol | None]]:
    """The configurations with their protocols named and fingerprinted, and the protocol of each
    (name, fingerprint). A protocol may be a shipped name, a template path or text, a Protocol, or
    `none` (the plain prompt)."""
    made: dict[Any, tuple[str, str, Protocol | None]] = {}
    resolved, protocols = [], {}
    for config in configs:
        given = config.protocol
        if given not in made:
            if isinstance(given, Protocol):
                protocol, name = given, given.name
            elif str(given).lower() == NO_PROTOCOL:
                protocol, name = None, NO_PROTOCOL
            else:
                protocol, name = Protocol(str(given), **options), str(given)
            made[given] = (name, protocol_fingerprint(protocol), protocol)
        name, digest, protocol = made[given]
        protocols[name, digest] = protocol
        resolved.append(replace(config, protocol=name, protocol_hash=digest))
    return list(dict.fromkeys(resolved)), protocols


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hogwild-agents")
    except PackageNotFoundError:
        return "unknown"


def eval_meta(dataset: Dataset, settings: EvalSettings, checker: Checker, model: str) -> dict[str, str]:
    """What every stored row depends on; a resumed eval must match it."""
    meta = {
        "dataset": dataset.name,
        "sample_seed": settings.sample_seed,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "checker": checker.kind,
        "tolerance": checker.tolerance,
        "model": model,
        "dtype": settings.dtype,
        "device": settings.device,
        "attention": settings.attention,
        "batch_size": settings.batch_size,
        "budget_unit": settings.budget_unit,
        "sync_every": settings.sync_every,
        "checkpoints": settings.checkpoints,
        "version": package_version(),
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

    `engine`: an engine, or a loader (a callable without `generate`) called once the database has
    accepted the settings. `model` names the model in the database (default: the engine's model path;
    required with a loader); `on_row` is called after each row is stored."""
    settings.check(configs)
    protocol_options = {}
    if settings.interjection_period is not None:
        protocol_options["interjection_period"] = settings.interjection_period
    configs, protocols = resolve_protocols(configs, protocol_options)
    loader = engine if callable(engine) and not hasattr(engine, "generate") else None
    if loader is not None and model is None:
        raise EvalError("run_eval with an engine loader needs model= to name the model.")
    if model is None:
        model = str(getattr(engine.model, "name_or_path", "") or type(engine.model).__name__)
    meta = eval_meta(dataset, settings, checker, model)
    store.check_meta(meta)  # before the engine loads
    done = store.result_keys()
    todo = [
        (problem, config, budget, seed)
        for seed in settings.seeds
        for problem in dataset.problems
        for config in configs
        for budget in settings.budgets
        if (problem.id, config.key, budget, seed) not in done
    ]
    if todo and loader is not None:
        engine = loader()
    store.ensure_meta(meta)
    store.add_problems(dataset.problems)
    store.add_configs(configs)
    have = store.run_keys()
    needed = {
        (p.id, spec): None for p, c, b, seed in todo for spec in c.runs(b, seed) if (p.id, spec) not in have
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
        protocols: dict[tuple[str, str], Protocol | None],
        settings: EvalSettings,
        on_row: Callable[[ResultRow], None] | None,
    ) -> None:
        self.engine, self.store, self.checker = engine, store, checker
        self.protocols, self.settings, self.on_row = protocols, settings, on_row
        self.rows = 0
        self.report: Callable[[str], None] = lambda text: None
        self.advance: Callable[[int], None] = lambda amount: None

    def do_chunk(self, chunk: list[tuple[Problem, Config, int, int]], have: set[tuple[str, RunSpec]]) -> None:
        """All runs the chunk's rows need, submitted together (one batch), storing rows once complete."""
        jobs: dict[tuple[str, RunSpec], Problem] = {}
        for problem, config, budget, seed in chunk:
            for spec in config.runs(budget, seed):
                if (problem.id, spec) not in have:
                    jobs.setdefault((problem.id, spec), problem)
        if jobs:
            self.report(_describe(next(iter(jobs))[1]))
            batched = {key: p for key, p in jobs.items() if key[1].layout != REPREFILL_LAYOUT}
            if self.settings.checkpoints:
                self._run_checkpointed(batched)
            else:
                batch = [
                    ([{"role": "user", "content": problem.question}], self._options(spec, problem))
                    for (_, spec), problem in batched.items()
                ]
                for ((_, spec), problem), (prompt, options), (result, wall_s) in zip(
                    batched.items(), batch, run_batch(self.engine, batch), strict=True
                ):
                    self._store_run(problem, spec, options["seed"], prompt, result, wall_s)
            for key in batched:
                have.add(key)
                self.advance(key[1].budget)
            for (_, spec), problem in jobs.items():
                if spec.layout == REPREFILL_LAYOUT:  # agents in their own sequences, one run at a time
                    self._run_reprefill(problem, spec)
                    have.add((problem.id, spec))
                    self.advance(spec.budget)
        self._store_rows(chunk, have)

    def _run_checkpointed(self, jobs: dict[tuple[str, RunSpec], Problem]) -> None:
        """One run per (problem, spec but its budget), capped at the largest budget needed and read at
        the smaller ones on its way; each budget stored as its own run."""
        groups: dict[tuple[str, RunSpec], list[RunSpec]] = {}
        for problem_id, spec in jobs:
            groups.setdefault((problem_id, replace(spec, budget=0)), []).append(spec)
        mains, batch, clocks, forks = [], [], [], ForkTime()
        for (problem_id, _), specs in groups.items():
            specs.sort(key=lambda spec: spec.budget)
            problem = jobs[problem_id, specs[-1]]
            mains.append((problem, specs))
            batch.append(([{"role": "user", "content": problem.question}], self._options(specs[-1], problem)))
            clocks.append(_Checkpoints([spec.budget for spec in specs[:-1]], forks))
        timed = run_batch(self.engine, batch, clocks)
        for (problem, specs), (prompt, options), (result, wall_s), clock in zip(
            mains, batch, timed, clocks, strict=True
        ):
            for spec in specs:  # a budget the run never reached: it ended first, as the capped run would
                at, at_wall = clock.results.get(spec.budget, (result, wall_s))
                self._store_run(problem, spec, options["seed"], prompt, at, at_wall)

    def _run_reprefill(self, problem: Problem, spec: RunSpec) -> None:
        """The re-prefill message-passing baseline's run of `problem` (its own driver), stored."""
        self.report(_describe(spec))
        prompt = [{"role": "user", "content": problem.question}]
        options = self._options(spec, problem)
        start = time.perf_counter()
        result = run_reprefill(
            self.engine, prompt, n_agents=spec.n_workers, sync_every=self.settings.sync_every, **options
        )
        self._store_run(problem, spec, options["seed"], prompt, result, time.perf_counter() - start)

    def _options(self, spec: RunSpec, problem: Problem) -> dict[str, Any]:
        options = dict(
            n_workers=spec.n_workers,
            layout=spec.layout,
            protocol=self.protocols[spec.protocol, spec.protocol_hash],
            max_new_tokens=spec.budget,  # by forwards too: a worker writes at most one token per forward
            temperature=self.settings.temperature,
            top_p=self.settings.top_p,
            seed=spec.run_seed(problem.id, self.settings.checkpoints and spec.layout != REPREFILL_LAYOUT),
            attention=self.settings.attention,
        )
        if self.settings.budget_unit == "forwards":
            options["max_forward_passes"] = spec.budget
        return options

    def _store_run(
        self,
        problem: Problem,
        spec: RunSpec,
        run_seed: int,
        prompt: Any,
        result: HogwildResult,
        wall_s: float,
    ) -> None:
        answer = result.answer if spec.protocol != NO_PROTOCOL else plain_answer(result)
        record = RunRecord(
            problem=problem.id,
            spec=spec,
            run_seed=run_seed,
            answer=answer,
            generated_tokens=result.usage.generated_tokens,
            forward_passes=result.forward_passes,
            forward_tokens=result.usage.tokens_after_prompt,
            wall_s=wall_s,
            finish_reason=result.finish_reason,
        )
        prompt_text = self._prompt_text(prompt, spec)
        self.store.add_run(record, transcript_page(problem, spec, result, prompt_text, answer))

    def _prompt_text(self, prompt: Any, spec: RunSpec) -> str:
        """The full prompt the run started from (as the engine renders it), or the messages."""
        script = getattr(self.engine, "script", None)
        if script is not None:
            try:
                protocol = self.protocols[spec.protocol, spec.protocol_hash]
                layout = "interleaved" if spec.layout == REPREFILL_LAYOUT else spec.layout
                return script(prompt, spec.n_workers, layout, protocol, []).prompt
            except Exception:  # an engine without the renderer: fall back to the messages
                pass
        return "\n\n".join(f"{m['role']}: {m['content']}" for m in prompt)

    def _store_rows(
        self, pending: list[tuple[Problem, Config, int, int]], have: set[tuple[str, RunSpec]]
    ) -> list[tuple[Problem, Config, int, int]]:
        """Store the rows whose runs are all in; returns the others."""
        left = []
        for problem, config, budget, seed in pending:
            specs = config.runs(budget, seed)
            if any((problem.id, spec) not in have for spec in specs):
                left.append((problem, config, budget, seed))
                continue
            row = make_row(
                problem, config, budget, seed, [self.store.run(problem.id, s) for s in specs], self.checker
            )
            self.store.add_result(row)
            self.rows += 1
            self.report(_describe(specs[-1]))
            if self.on_row is not None:
                self.on_row(row)
        return left


def make_row(
    problem: Problem, config: Config, budget: int, seed: int, runs: Sequence[RunRecord], checker: Checker
) -> ResultRow:
    """The row of `problem` x `config` x `budget` x `seed` from its runs (a vote's majority over its
    samples; its forward passes and wall time those of its longest sample, its tokens the sum)."""
    samples = tuple(run.answer for run in runs)
    answer = majority(samples, checker, problem) if config.method == "vote" else samples[0]
    score = checker.score(answer, problem)
    return ResultRow(
        problem=problem.id,
        config=config.key,
        budget=budget,
        seed=seed,
        answer=answer,
        correct=score >= 1.0,
        score=score,
        samples=samples,
        tokens=sum(run.generated_tokens for run in runs),
        forward_passes=max(run.forward_passes for run in runs),
        forward_tokens=sum(run.forward_tokens for run in runs),
        wall_s=max(run.wall_s for run in runs),
        finish_reason=",".join(sorted({run.finish_reason for run in runs})),
    )


def plain_answer(result: HogwildResult) -> str | None:
    """The answer of a run without a protocol: its last \\boxed{} answer, else its last number."""
    text = result.workers[0].text if result.workers else result.final_text
    boxed = re.findall(r"\\boxed\s*\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    numbers = re.findall(r"[-+]?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "") if numbers else None


def transcript_page(
    problem: Problem, spec: RunSpec, result: HogwildResult, prompt: str = "", answer: str | None = None
) -> str:
    """The run's HTML transcript (transcript.render_html) headed by the problem, the full prompt and
    its answers."""
    esc = html.escape
    title = f"Problem {problem.id} \u00b7 {_describe(spec)}"
    head = (
        '<div class="problem"><h2>Problem</h2>'
        f'<div class="timeline">{esc(problem.question)}</div>'
        f'<p class="meta">reference answer: <b>{esc(problem.answer)}</b> &middot; extracted answer: '
        f"<b>{esc(str(answer if answer is not None else result.answer))}</b></p>"
        f'<h2>Prompt</h2><pre class="prompt">{esc(prompt)}</pre></div>'
    )
    page = render_html(result, title=title)
    return page.replace("<h2>Final answer</h2>", head + "\n<h2>Final answer</h2>", 1)


def _describe(spec: RunSpec) -> str:
    workers = "1 worker" if spec.n_workers == 1 else f"{spec.n_workers} workers, {spec.layout}"
    seed = f", seed {spec.seed}" + (f" sample {spec.sample}" if spec.sample else "")
    return f"{workers}, {spec.protocol}, budget {spec.budget}{seed}"


def _chunks(
    todo: list[tuple[Problem, Config, int, int]], size: int
) -> list[list[tuple[Problem, Config, int, int]]]:
    """The rows grouped by (seed, problem), `size` problems per chunk, in order."""
    order = list(dict.fromkeys((row[3], row[0].id) for row in todo))
    chunk_of = {key: i // size for i, key in enumerate(order)}
    chunks: list[list] = [[] for _ in range((len(order) + size - 1) // size)]
    for row in todo:
        chunks[chunk_of[row[3], row[0].id]].append(row)
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
