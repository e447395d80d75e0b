"""Engines and a tiny grid for the eval tests: a counting wrapper, and a fake engine that answers at once."""

from __future__ import annotations

from types import SimpleNamespace

from hogwild_agents.evaluation import EvalSettings, ResultStore, build_grid, make_checker, run_eval
from hogwild_agents.evaluation.datasets import Dataset, Problem
from hogwild_agents.results import HogwildResult, TraceEvent, Usage, WorkerResult

PROBLEMS = [Problem("a", "What is 3 + 4?", "7"), Problem("b", "What is 2 * 5?", "10")]
GOLD = {p.question: p.answer for p in PROBLEMS}
RUN_OPTIONS = ("n_workers", "layout", "max_new_tokens", "seed")


class CountingEngine:
    """An engine that records every run it is asked for. With `many` it has `submit` (the wrapped
    engine's: runs queued together, sharing forwards); without, runs go one at a time through
    `generate`."""

    def __init__(self, engine, many: bool = False) -> None:
        self.engine = engine
        self.calls: list[tuple] = []
        self.submit = self._submit if many else None

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompt, **options):
        self.calls.append((prompt[0]["content"], *(options.get(k) for k in RUN_OPTIONS)))
        return self.engine.generate(prompt, **options)

    def _submit(self, prompt, **options):
        self.calls.append((prompt[0]["content"], *(options.get(k) for k in RUN_OPTIONS)))
        return self.engine.submit(prompt, **options)


class FakeEngine:
    """Answers at once, without a model: right when `seed + n_workers + budget` is even, else wrong;
    every worker writes its whole budget (naming the seed) and the run takes its forward-pass cap
    (without one, budget + 2 forwards)."""

    model = SimpleNamespace(name_or_path="fake-model")

    def generate(self, prompt, *, n_workers=1, max_new_tokens=8, seed=0, max_forward_passes=None, **options):
        gold = GOLD[prompt[0]["content"]]
        answer = gold if (seed + n_workers + max_new_tokens) % 2 == 0 else gold + "1"
        names = ["Alice", "Bob", "Carol", "Dave"][:n_workers]
        text = f"Thinking (seed {seed})... \\boxed{{{answer}}}"
        return HogwildResult(
            final_text=answer,
            answer=answer,
            workers=[WorkerResult(n, text, [], max_new_tokens, "length", 1) for n in names],
            shared_text="",
            usage=Usage(10, n_workers * max_new_tokens, 10 + n_workers * max_new_tokens),
            steps=max_new_tokens + 2,
            finish_reason="length",
            trace=[TraceEvent(0, i, "sampled", text + "\n") for i in range(n_workers)],
            forward_passes=max_forward_passes or max_new_tokens + 2,
        )


def right(run_seed: int, n_workers: int, budget: int) -> bool:
    """Whether FakeEngine answers right."""
    return (run_seed + n_workers + budget) % 2 == 0


def tiny_eval(
    engine,
    store: ResultStore,
    *,
    budgets=(2, 3),
    on_row=None,
    temperature=0.6,
    batch_size=8,
    seeds=(0,),
    protocols=("collaborate",),
    model=None,
    budget_unit="tokens",
):
    """Both problems x (1 worker, Hogwild x2, idealised message passing x2, vote of 2) x `budgets` x
    `seeds` (budgets in tokens per worker unless told)."""
    dataset = Dataset("tiny", PROBLEMS)
    configs = build_grid([1, 2], list(protocols), ["combined"], ("single", "vote", "msgpass"))
    settings = EvalSettings(
        budgets=budgets, temperature=temperature, batch_size=batch_size, seeds=seeds, budget_unit=budget_unit
    )
    checker = make_checker("auto", dataset)
    return run_eval(
        engine, dataset, configs, settings, store, checker, progress=False, on_row=on_row, model=model
    )
