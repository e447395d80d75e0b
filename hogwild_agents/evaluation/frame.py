"""Per-problem rows as a table: `run_grid` (the Python API: an eval returning a pandas DataFrame) and
the CSV / Parquet export of a results database (`hogwild eval-report DB --csv FILE --parquet FILE`).

One row per (problem, configuration, budget, seed), with the configuration's method, workers, protocol,
protocol fingerprint and layout, the reference and extracted answers, correctness, score, tokens,
forward passes, forward tokens (processed after the prompt), wall seconds and finish reason. pandas
(the `eval` extra) is imported only here; Parquet also needs pyarrow.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation.checkers import Checker, make_checker
from hogwild_agents.evaluation.datasets import INSTALL_HINT, Dataset, Problem
from hogwild_agents.evaluation.grid import Config
from hogwild_agents.evaluation.runner import EvalSettings, resolve_protocols, run_eval
from hogwild_agents.evaluation.store import ResultRow, ResultStore

COLUMNS = (
    "problem", "config", "label", "method", "workers", "protocol", "protocol_hash", "layout", "budget",
    "seed", "reference", "answer", "correct", "score", "samples", "tokens", "forward_passes",
    "forward_tokens", "wall_s", "finish_reason",
)  # fmt: skip


def records(
    rows: Sequence[ResultRow], configs: Sequence[Config], problems: Sequence[Problem]
) -> list[dict[str, Any]]:
    """The rows of the current configurations as dicts (COLUMNS), in configuration order."""
    by_key = {c.key: (i, c) for i, c in enumerate(configs)}
    reference = {p.id: p.answer for p in problems}
    out = []
    for row in rows:
        if row.config not in by_key:
            continue  # a configuration replaced since (an edited template)
        config = by_key[row.config][1]
        values = asdict(row)
        values.pop("created")
        values["samples"] = "|".join("" if s is None else str(s) for s in row.samples)
        out.append(
            {
                **values,
                "label": config.label,
                "method": config.method,
                "workers": config.workers,
                "protocol": str(config.protocol),
                "protocol_hash": config.protocol_hash,
                "layout": config.layout,
                "reference": reference.get(row.problem, ""),
            }
        )
    out.sort(key=lambda r: (by_key[r["config"]][0], r["budget"], r["seed"]))
    return [{column: r[column] for column in COLUMNS} for r in out]


def dataframe(items: list[dict[str, Any]]) -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise EvalError(f"A DataFrame needs pandas; {INSTALL_HINT}.") from None
    return pd.DataFrame(items, columns=list(COLUMNS))


def store_records(store: ResultStore) -> list[dict[str, Any]]:
    return records(store.results(), store.configs(), store.problems())


def export(
    db: str | Path, csv_path: str | Path | None = None, parquet_path: str | Path | None = None
) -> None:
    """Write the database's per-problem rows as CSV (always available) and/or Parquet (needs pyarrow)."""
    store = ResultStore.open_existing(db)
    try:
        items = store_records(store)
    finally:
        store.close()
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(items)
    if parquet_path is not None:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise EvalError("Parquet export needs pyarrow: pip install pyarrow (or use --csv).") from None
        dataframe(items).to_parquet(parquet_path)


def run_grid(
    engine: Any,
    dataset: Dataset,
    configs: Sequence[Config],
    settings: EvalSettings,
    *,
    db: str | Path = ":memory:",
    checker: Checker | None = None,
    model: str | None = None,
    progress: bool = False,
) -> Any:
    """Run (or resume, with a database path) the grid and return a pandas DataFrame with one row per
    (problem, configuration, budget, seed) of this grid (COLUMNS). `db` defaults to an in-memory
    database; `engine` may be a loader (see `run_eval`)."""
    checker = checker or make_checker("auto", dataset)
    store = ResultStore(db)
    try:
        run_eval(engine, dataset, configs, settings, store, checker, model=model, progress=progress)
        items = store_records(store)
    finally:
        store.close()
    options = (
        {} if settings.interjection_period is None else {"interjection_period": settings.interjection_period}
    )
    keys = {c.key for c in resolve_protocols(configs, options)[0]}
    ids, seeds, budgets = {p.id for p in dataset.problems}, set(settings.seeds), set(settings.budgets)
    items = [
        r
        for r in items
        if r["config"] in keys and r["problem"] in ids and r["seed"] in seeds and r["budget"] in budgets
    ]
    return dataframe(items)
