"""The eval report: summaries, the PNG, and the HTML page rendered in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from hogwild_agents.cli import main
from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation import (
    EvalSettings,
    ResultStore,
    build_grid,
    make_checker,
    run_eval,
    write_report,
)
from hogwild_agents.evaluation.datasets import Dataset
from hogwild_agents.evaluation.report import line_style, summarise
from hogwild_agents.evaluation.stats import mcnemar_exact, paired_test, wilson
from tests.eval_helpers import PROBLEMS, FakeEngine, tiny_eval

# Runs in the page once it has loaded: each image's natural width, and whether each link's target
# loads and is a transcript (file:// reads need --allow-file-access-from-files).
CHECK_SCRIPT = """
<script>
window.addEventListener("load", () => {
  const images = [...document.images].map((image) => image.naturalWidth);
  const links = [...document.querySelectorAll("a[href]")].map((link) => {
    const request = new XMLHttpRequest();
    try {
      request.open("GET", link.href, false);
      request.send();
      return request.responseText.includes("<h2>Final answer</h2>") ? "ok" : "not a transcript: " + link.href;
    } catch (error) {
      return "unreadable: " + link.href;
    }
  });
  const out = document.createElement("pre");
  out.id = "check";
  out.textContent = JSON.stringify({ images, links });
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "needs Debian's chromium: apt-get install -y chromium (.ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def _check_in_chromium(page: Path) -> dict:
    """Load a copy of `page` (next to it, so its links resolve alike) with CHECK_SCRIPT in headless
    Chromium; returns what the script found."""
    probe = page.with_name("chromium_check.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK_SCRIPT + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                _chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--allow-file-access-from-files",
                "--virtual-time-budget=10000",
                "--dump-dom",
                probe.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
    match = re.search(r'<pre id="check">(.*?)</pre>', done.stdout, re.DOTALL)
    assert match is not None, f"the page did not finish loading: {done.stderr[-2000:]}"
    return json.loads(match.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _database(path: Path, seed_engine: FakeEngine | None = None, budgets=(2, 3)) -> Path:
    with ResultStore(path) as store:
        tiny_eval(seed_engine or FakeEngine(), store, budgets=budgets)
    return path


def _links(page: Path) -> list[str]:
    return re.findall(r'<a href="([^"]+)"', page.read_text(encoding="utf-8"))


def test_points_summarise_each_configuration_and_budget(tmp_path):
    with ResultStore(_database(tmp_path / "r.sqlite")) as store:
        points = summarise(store.results(), store.configs())
    assert [(p.config.name, p.budget) for p in points][:3] == [
        ("single/collaborate", 2),
        ("single/collaborate", 3),
        ("hogwild-combined-x2/collaborate", 2),
    ]
    single3 = points[1]
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = [r for r in store.results() if r.config.startswith("single/") and r.budget == 3]
    correct = sum(r.correct for r in rows)
    assert (single3.problems, single3.correct, single3.accuracy) == (2, correct, correct / 2)
    low, high = single3.interval
    assert low <= single3.accuracy <= high and high - low > 0.3  # Wilson: never zero width
    assert single3.score == correct / 2 and single3.seeds == 1
    assert single3.forward_passes == 5 and single3.tokens == 3
    if correct:
        assert single3.per_correct(single3.tokens) == 3 * 2 / correct
        assert single3.per_correct(single3.wall_s) == pytest.approx(sum(r.wall_s for r in rows) / correct)
    else:
        assert single3.per_correct(single3.tokens) == float("inf")
    vote2 = next(p for p in points if p.config.method == "vote" and p.budget == 2)
    assert vote2.forward_passes == 4 and vote2.tokens == 4


def test_the_report_renders_in_headless_chromium(tmp_path):
    out = tmp_path / "report"
    page = write_report([_database(tmp_path / "r.sqlite")], out)
    assert page == out / "report.html" and (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    text = page.read_text(encoding="utf-8")
    assert not re.search(r'(src|href)="(https?:)?//', text)  # self-contained: nothing from elsewhere
    assert "Vote of 2 \u00b7 collaborate" in text
    assert "Message passing, shared cache (idealised) \u00d72" in text
    links = _links(page)
    assert len(links) == 2 * 2 * (1 + 1 + 1 + 2)  # problems x budgets x runs (a vote links each sample)
    assert all((out / link).is_file() for link in links)
    found = _check_in_chromium(page)
    assert len(found["images"]) == 1 and found["images"][0] > 500
    assert found["links"] == ["ok"] * len(links)


def test_two_databases_are_compared_side_by_side(tmp_path, capsys):
    first = _database(tmp_path / "first.sqlite")
    second = _database(tmp_path / "second.sqlite", budgets=(3, 4))
    out = tmp_path / "compare"
    assert main(["eval-report", str(first), "--compare", str(second), "--out", str(out)]) == 0
    page = out / "report.html"
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    assert "Hogwild eval: first vs second" in text and "&Delta; accuracy" in text
    assert "Problems (first)" in text and "Problems (second)" in text
    links = _links(page)
    assert {link.split("/")[1] for link in links} == {"a", "b"}
    found = _check_in_chromium(page)
    assert found["images"][0] > 500 and found["links"] == ["ok"] * len(links)


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(EvalError, match="No results database"):
        write_report([tmp_path / "missing.sqlite"], tmp_path)
    ResultStore(tmp_path / "empty.sqlite").close()
    with pytest.raises(SystemExit, match=r"hogwild eval-report: .*holds no eval results"):
        main(["eval-report", str(tmp_path / "empty.sqlite")])


def test_wilson_intervals_have_width_at_zero_and_all():
    low, high = wilson(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12) and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson(10, 10)
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-3) and high > low
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-3) and high == pytest.approx(0.7634, abs=1e-3)


def test_the_exact_mcnemar_test_on_known_tables():
    # 1 vs 9 discordant pairs: 2 * (1 + 10) / 1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    a = {("p", 0): True, ("q", 0): True, ("r", 0): False, ("s", 0): True}
    b = {("p", 0): False, ("q", 0): True, ("r", 0): True, ("t", 0): True}
    test = paired_test("a", "b", 4, a, b)
    assert (test.pairs, test.a_only, test.b_only, test.a_correct, test.b_correct) == (3, 1, 1, 2, 2)
    assert test.p == 1.0 and not test.significant


def test_the_report_states_which_differences_are_significant(tmp_path):
    page = write_report([_database(tmp_path / "r.sqlite")], tmp_path / "out")
    text = page.read_text(encoding="utf-8")
    assert "Paired tests" in text and "Wilson 95%" in text
    assert "No difference between configurations is significant" in text  # 2 problems: nothing can be


def test_every_line_of_the_plot_has_its_own_style():
    styles = [line_style(i) for i in range(140)]
    assert len(set(styles)) == 140
    assert len({colour for colour, _, _ in styles[:10]}) == 10


def test_several_databases_are_compared_with_a_warning_when_the_datasets_differ(tmp_path, capsys):
    first = _database(tmp_path / "first.sqlite")
    second = _database(tmp_path / "second.sqlite", budgets=(3,))
    with ResultStore(tmp_path / "third.sqlite") as store:  # another dataset
        run_eval(
            FakeEngine(), Dataset("other", PROBLEMS[:1]), build_grid([1], ["collaborate"], ["combined"]),
            EvalSettings(budgets=(2,)), store, make_checker("auto", Dataset("other", PROBLEMS[:1])),
            progress=False,
        )  # fmt: skip
    out = tmp_path / "three"
    argv = ["eval-report", str(first), "--compare", str(second), "--compare", str(tmp_path / "third.sqlite")]
    assert main([*argv, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: the databases hold different datasets" in err and "'other'" in err
    text = (out / "report.html").read_text(encoding="utf-8")
    assert "Hogwild eval: first vs second vs third" in text and "Warning: the databases" in text
    assert text.count("&Delta; accuracy (points)") == 2  # each against the first
    assert {link.split("/")[1] for link in _links(out / "report.html")} == {"a", "b", "c"}
    with pytest.warns(UserWarning, match="different datasets"):
        write_report([first, tmp_path / "third.sqlite"], tmp_path / "two")
