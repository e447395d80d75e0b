"""Every example runs on the embedded default model with a small token budget."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SMALL_BUDGET = {
    "quickstart.py": ["--max-tokens", "12"],
    "step_by_step.py": ["--steps", "10"],
    "protocols.py": ["--max-tokens", "10"],
    "tool_pipeline.py": ["--max-tokens", "12"],
    "langgraph_agent.py": [],  # a fixed two-turn agent round trip
}


def test_every_example_has_a_smoke_budget():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SMALL_BUDGET)


@pytest.mark.parametrize("name", sorted(SMALL_BUDGET))
def test_example_runs(name, smol_engine):  # smol_engine: the default model is converted and cached first
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *SMALL_BUDGET[name]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip()
