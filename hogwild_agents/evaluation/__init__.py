"""`hogwild eval`: protocol experiments on a dataset, accuracy against a budget of forward passes.

Modules: `datasets` (JSONL files, reasoning-gym generators), `checkers` (numeric, exact, the generator's
scorer), `grid` (configurations and the runs they need), `store` (the SQLite results database),
`runner` (the resumable eval loop), `stats` (Wilson intervals, McNemar tests), `report` (PNG plot and
HTML page), `frame` (`run_grid` returning a DataFrame; CSV/Parquet export), `command` (the CLI
subcommands). matplotlib, pandas and reasoning-gym (the `eval` extra) are imported only where they are
used.
"""

from hogwild_agents.evaluation.checkers import Checker, make_checker
from hogwild_agents.evaluation.datasets import Dataset, Problem, load_dataset
from hogwild_agents.evaluation.frame import export, run_grid
from hogwild_agents.evaluation.grid import Config, RunSpec, build_grid
from hogwild_agents.evaluation.report import write_report
from hogwild_agents.evaluation.runner import EvalSettings, run_eval
from hogwild_agents.evaluation.store import ResultRow, ResultStore

__all__ = [
    "Checker",
    "Config",
    "Dataset",
    "EvalSettings",
    "Problem",
    "ResultRow",
    "ResultStore",
    "RunSpec",
    "build_grid",
    "export",
    "load_dataset",
    "make_checker",
    "run_eval",
    "run_grid",
    "write_report",
]
