"""The results database (SQLite): what an eval computed, so that it resumes and can be compared.

Tables:
- `meta`: what every row depends on (dataset, sample seed, sampling, checker, model, dtype, device,
  attention, batch size, package version); an eval that resumes must match it.
- `problems`, `configs`: the dataset's problems and the grid's configurations (keyed by `Config.key`,
  which holds the protocol's content fingerprint), in order.
- `runs`: one engine run (problem x RunSpec): its sampling seed, extracted answer, tokens, forward
  passes, wall time and the HTML transcript (zlib-compressed). Configurations that need the same run
  share it.
- `results`: one row per problem x configuration x budget x replicate seed: the answer (a vote's
  majority), its score and correctness, tokens, forward passes, wall time, and the runs it was made
  from.
"""

from __future__ import annotations

import json
import sqlite3
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation.datasets import Problem
from hogwild_agents.evaluation.grid import Config, RunSpec

SCHEMA_VERSION = "3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS problems (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, question TEXT NOT NULL, answer TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS configs (
    key TEXT PRIMARY KEY, position INTEGER NOT NULL, method TEXT NOT NULL, workers INTEGER NOT NULL,
    protocol TEXT NOT NULL, layout TEXT NOT NULL, protocol_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    problem TEXT NOT NULL, protocol TEXT NOT NULL, protocol_hash TEXT NOT NULL, n_workers INTEGER NOT NULL,
    layout TEXT NOT NULL, budget INTEGER NOT NULL, seed INTEGER NOT NULL, sample INTEGER NOT NULL,
    run_seed INTEGER NOT NULL,
    answer TEXT, generated_tokens INTEGER NOT NULL, forward_passes INTEGER NOT NULL,
    forward_tokens INTEGER NOT NULL,
    wall_s REAL NOT NULL, finish_reason TEXT NOT NULL, transcript BLOB NOT NULL,
    PRIMARY KEY (problem, protocol, protocol_hash, n_workers, layout, budget, seed, sample));
CREATE TABLE IF NOT EXISTS results (
    problem TEXT NOT NULL, config TEXT NOT NULL, budget INTEGER NOT NULL, seed INTEGER NOT NULL,
    answer TEXT, correct INTEGER NOT NULL, score REAL NOT NULL, samples TEXT NOT NULL,
    tokens INTEGER NOT NULL, forward_passes INTEGER NOT NULL, forward_tokens INTEGER NOT NULL,
    wall_s REAL NOT NULL, finish_reason TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (problem, config, budget, seed));
"""


_SPEC = ", ".join(f.name for f in fields(RunSpec))
_WHERE = "problem = ? AND " + " AND ".join(f"{f.name} = ?" for f in fields(RunSpec))


@dataclass(frozen=True)
class RunRecord:
    """What the store keeps of one engine run."""

    problem: str
    spec: RunSpec
    run_seed: int  # the sampling seed the engine was given
    answer: str | None
    generated_tokens: int  # sampled by all workers together
    forward_passes: int  # forwards after the prompt (headers, re-prefills and the finisher included)
    forward_tokens: int  # tokens the model processed after the prompt (its prefill left out)
    wall_s: float  # from the run's own start to its own end
    finish_reason: str


@dataclass(frozen=True)
class ResultRow:
    """One problem x configuration x budget x replicate seed (`config` is the `Config.key`)."""

    problem: str
    config: str
    budget: int
    seed: int
    answer: str | None
    correct: bool
    score: float
    samples: tuple[str | None, ...]  # the answer of each run (a vote's samples)
    tokens: int  # generated tokens of all its runs
    forward_passes: int  # of its longest run (a vote's samples run side by side)
    forward_tokens: int
    wall_s: float  # of its longest run (a vote's samples run side by side)
    finish_reason: str
    created: float = 0.0


class ResultStore:
    """An eval's SQLite database at `path` (created when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path)
            with self.db:
                self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise EvalError(f"{self.path} is not a usable results database ({err}).") from None

    @classmethod
    def open_existing(cls, path: str | Path) -> ResultStore:
        """A database an eval wrote (for reports); an error when there is none at `path`."""
        if not Path(path).is_file():
            raise EvalError(f"No results database at {str(path)!r}; run `hogwild eval ... --db PATH` first.")
        store = cls(path)
        if "schema" not in store.meta():
            raise EvalError(f"{path} holds no eval results.")
        return store

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what the eval is ----------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def ensure_meta(self, meta: Mapping[str, str]) -> None:
        """Record the eval's settings, or check that they match the ones this database was made with."""
        self.check_meta(meta)
        wanted = {"schema": SCHEMA_VERSION, **{k: str(v) for k, v in meta.items()}}
        self.record_meta(wanted)

    def check_meta(self, meta: Mapping[str, str]) -> None:
        """Refuse settings that differ from the recorded ones (nothing is written)."""
        stored = self.meta()
        wanted = {"schema": SCHEMA_VERSION, **{k: str(v) for k, v in meta.items()}}
        differ = {k: (stored[k], v) for k, v in wanted.items() if k in stored and stored[k] != v}
        if differ:
            lines = "; ".join(f"{k}: database {old!r}, now {new!r}" for k, (old, new) in differ.items())
            raise EvalError(
                f"{self.path} holds an eval with other settings ({lines}). Resume with the same settings, "
                "or give another --db."
            )

    def record_meta(self, wanted: Mapping[str, str]) -> None:
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", wanted.items())

    def add_problems(self, problems: Iterable[Problem]) -> None:
        rows = [(p.id, i, p.question, p.answer) for i, p in enumerate(problems)]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO problems VALUES (?, ?, ?, ?)", rows)

    def add_configs(self, configs: Iterable[Config]) -> None:
        """The eval's configurations; a configuration of the same name with another key (an edited
        template) replaces the old one in the report (its rows stay in the database)."""
        configs = list(configs)
        rows = [
            (c.key, i, c.method, c.workers, str(c.protocol), c.layout, c.protocol_hash)
            for i, c in enumerate(configs)
        ]
        stale = [(c.name, c.key) for c in configs]
        with self.db:
            for config in self.configs():
                if any(config.name == name and config.key != key for name, key in stale):
                    self.db.execute("DELETE FROM configs WHERE key = ?", (config.key,))
            self.db.executemany("INSERT OR REPLACE INTO configs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)

    def problems(self) -> list[Problem]:
        query = "SELECT id, question, answer FROM problems ORDER BY position, id"
        return [Problem(*row) for row in self.db.execute(query)]

    def configs(self) -> list[Config]:
        query = "SELECT method, workers, protocol, layout, protocol_hash FROM configs ORDER BY position, key"
        return [Config(*row) for row in self.db.execute(query)]

    # ---- runs ----------------------------------------------------------------------------------
    def run_keys(self) -> set[tuple[str, RunSpec]]:
        query = f"SELECT problem, {_SPEC} FROM runs"
        return {(row[0], RunSpec(*row[1:])) for row in self.db.execute(query)}

    def add_run(self, record: RunRecord, transcript: str) -> None:
        spec = record.spec
        values = (
            record.problem,
            *astuple(spec),
            record.run_seed,
            record.answer,
            record.generated_tokens,
            record.forward_passes,
            record.forward_tokens,
            record.wall_s,
            record.finish_reason,
            zlib.compress(transcript.encode("utf-8")),
        )
        with self.db:
            self.db.execute(f"INSERT INTO runs VALUES ({', '.join('?' * len(values))})", values)

    def run(self, problem: str, spec: RunSpec) -> RunRecord:
        query = (
            "SELECT run_seed, answer, generated_tokens, forward_passes, forward_tokens, wall_s, "
            f"finish_reason FROM runs WHERE {_WHERE}"
        )
        row = self.db.execute(query, (problem, *astuple(spec))).fetchone()
        if row is None:
            raise KeyError((problem, spec))
        return RunRecord(problem, spec, *row)

    def transcript(self, problem: str, spec: RunSpec) -> str:
        query = f"SELECT transcript FROM runs WHERE {_WHERE}"
        row = self.db.execute(query, (problem, *astuple(spec))).fetchone()
        if row is None:
            raise KeyError((problem, spec))
        return zlib.decompress(row[0]).decode("utf-8")

    # ---- results -------------------------------------------------------------------------------
    def result_keys(self) -> set[tuple[str, str, int, int]]:
        return set(self.db.execute("SELECT problem, config, budget, seed FROM results"))

    def add_result(self, row: ResultRow) -> None:
        values = list(astuple(row))
        values[7] = json.dumps(list(row.samples))
        values[-1] = row.created or time.time()
        with self.db:
            self.db.execute(f"INSERT INTO results VALUES ({', '.join('?' * len(values))})", values)

    def results(self) -> list[ResultRow]:
        names = ", ".join(f.name for f in fields(ResultRow))
        rows = []
        for values in self.db.execute(f"SELECT {names} FROM results ORDER BY rowid"):
            values = list(values)
            values[5] = bool(values[5])
            values[7] = tuple(json.loads(values[7]))
            rows.append(ResultRow(*values))
        return rows
