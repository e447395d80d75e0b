"""The `hogwild` command, its live view and the HTML transcript."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from hogwild_agents.cli import build_parser, main
from hogwild_agents.live import LiveView
from hogwild_agents.transcript import merge_turns, render_html
from tests.conftest import named_script

QUESTION = "What is 7 * 8?"


def test_run_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--workers",
        "--protocol",
        "--layout",
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--seed",
        "--model",
        "--device",
        "--dtype",
        "--json",
        "--transcript",
        "--view",
        "--compile",
    ):
        assert option in text


def test_compile_flag_reaches_the_engine(capsys, monkeypatch, smol_engine):
    """`--compile` loads the engine with compile=True (a stand-in engine here: compiling the embedded
    model takes minutes on a CPU; tests/test_compile.py checks the compiled step)."""
    from hogwild_agents import cli

    loaded = []

    def from_pretrained(model=None, **options):
        loaded.append(options)
        return smol_engine

    monkeypatch.setattr(cli.HogwildEngine, "from_pretrained", from_pretrained)
    argv = ["run", QUESTION, "--workers", "1", "--protocol", "none", "--max-tokens", "2", "--json"]
    assert main([*argv, "--compile"]) == 0
    assert main(argv) == 0
    assert [options["compile"] for options in loaded] == [True, False]


def test_plain_run_prints_workers_answer_and_writes_a_transcript(capsys, tmp_path):
    page = tmp_path / "run.html"
    code = main(
        [
            "run",
            QUESTION,
            "--workers",
            "2",
            "--protocol",
            "none",
            "--max-tokens",
            "12",
            "--view",
            "plain",
            "--transcript",
            str(page),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "=== Final answer ===" in out and "[worker0]" in out and "[worker1]" in out
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "worker1" in html and "Timeline" in html


def test_json_output_is_the_result(capsys):
    assert main(["run", QUESTION, "--workers", "2", "--protocol", "none", "--max-tokens", "6", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["workers"]) == 2
    assert data["usage"]["generated_tokens"] == sum(w["generated_tokens"] for w in data["workers"])
    assert all(w["generated_tokens"] <= 6 for w in data["workers"])


def test_live_view_shows_every_worker_history_and_budget(smol_engine):
    prompt = smol_engine.chat_prompt(QUESTION)
    run = smol_engine.start(prompt, n_workers=3, protocol=named_script(prompt, 3), max_new_tokens=20)
    console = Console(file=io.StringIO(), width=150, force_terminal=False, record=True)
    with LiveView(run, console) as view:
        for _ in range(6):
            view.update(run.step())
        view.note("calculator(7*8) -> 56")
    screen = console.export_text()
    for name in ("Alice", "Bob", "Carol", "shared history", "calculator(7*8) -> 56", "/60 tokens"):
        assert name in screen


def test_transcript_merges_turns_in_time_order(smol_engine):
    prompt = smol_engine.chat_prompt(QUESTION)
    run = smol_engine.start(prompt, n_workers=2, protocol=named_script(prompt, 2), max_new_tokens=10)
    while not run.done:
        run.step()
    run.inject("shared <note> & more")
    result = run.result()
    turns = merge_turns(result.trace)
    assert "".join(t for w, _, t in turns if w == 0) == result.workers[0].text
    page = render_html(result, title="7 * 8 <check>")
    assert "shared &lt;note&gt; &amp; more" in page and "7 * 8 &lt;check&gt;" in page
    assert page.count('class="turn') == len(turns)


def test_templates_lists_the_shipped_protocols(capsys):
    assert main(["templates"]) == 0
    out = capsys.readouterr().out
    for name in ("collaborate", "ask_others", "check_redundancy", "divide_and_conquer", "vote"):
        assert name in out


def test_run_with_the_calculator_tool(capsys):
    code = main(
        [
            "run",
            "What is 17 * 23?",
            "--workers",
            "2",
            "--max-tokens",
            "8",
            "--tools",
            "calculator",
            "--view",
            "plain",
            "--json",
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["workers"]
    with pytest.raises(SystemExit, match="unknown tool 'shell'"):
        main(["run", "x", "--tools", "shell"])
