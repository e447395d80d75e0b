"""The soak benchmark, for 60 seconds: 8 threads and 8 asyncio tasks of mixed calls on one engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_minute_of_mixed_concurrent_calls_passes_every_check():
    command = [sys.executable, "-m", "benchmarks.soak", "--seconds", "60", "--call-deadline", "240"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = done.stdout
    assert done.returncode == 0 and summary.rstrip().endswith("PASS"), summary + done.stderr[-3000:]
    assert "(0 differ)" in summary and "engine free at the end: True" in summary
    for kind in ("invoke", "stream", "abandoned_stream", "cancelled", "timeout", "tool_raises", "structured"):
        assert f"  {kind} " in summary
