"""The `hogwild` command, its live view and the HTML transcript."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from hogwild_agents.cli import build_parser, main
from hogwild_agents.engine import HogwildEngine
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


# ---- errors: one line, a non-zero exit code, checked before the model loads ------------------------------


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `hogwild ARGV` (argparse's own errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code not in (0, None), err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("hogwild: error: "), err  # (a loading bar may precede)
    assert err.strip().splitlines()[-1] == errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the command loads a model: these errors must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the command line was checked")

    monkeypatch.setattr("hogwild_agents.cli.HogwildEngine.from_pretrained", refuse)


@pytest.mark.parametrize(
    ("make_path", "fragments"),
    [
        (lambda tmp: tmp / "missing" / "run.html", ("--transcript", "does not exist")),
        (lambda tmp: tmp, ("--transcript", "is a directory")),
        (lambda tmp: tmp / "missing" / "deeper" / "run.html", ("does not exist",)),
    ],
)
def test_bad_transcript_paths_are_refused_before_the_run(
    capsys, tmp_path, no_model_load, make_path, fragments
):
    path = str(make_path(tmp_path))
    code, out, err = run_cli(["run", QUESTION, "--max-tokens", "4", "--transcript", path], capsys)
    assert_one_line_error(code, err, *fragments)
    assert out == ""


@pytest.mark.parametrize("as_directory", [True, False])
def test_bad_json_paths_are_refused_before_the_run(capsys, tmp_path, no_model_load, as_directory):
    path = str(tmp_path if as_directory else tmp_path / "nowhere" / "out.json")
    code, _, err = run_cli(["run", QUESTION, "--json", path], capsys)
    assert_one_line_error(code, err, "--json", "directory")


def test_json_to_a_file_keeps_the_printed_answer(capsys, tmp_path):
    out_file = tmp_path / "result.json"
    code, out, _ = run_cli(
        ["run", QUESTION, "--protocol", "none", "--max-tokens", "4", "--view", "plain", f"--json={out_file}"],
        capsys,
    )
    assert code == 0 and "=== Final answer ===" in out
    assert len(json.loads(out_file.read_text())["workers"]) == 2


def test_a_write_that_fails_after_the_run_keeps_the_result(capsys, tmp_path, monkeypatch):
    folder = tmp_path / "out"
    folder.mkdir()
    load = HogwildEngine.from_pretrained

    def load_then_lose_the_folder(*args, **kwargs):
        engine = load(*args, **kwargs)
        folder.rmdir()  # the output directory disappears while the run goes on
        return engine

    monkeypatch.setattr("hogwild_agents.cli.HogwildEngine.from_pretrained", load_then_lose_the_folder)
    argv = ["run", QUESTION, "--protocol", "none", "--max-tokens", "4", "--view", "plain"]
    code, out, err = run_cli([*argv, "--transcript", str(folder / "run.html")], capsys)
    assert "=== Final answer ===" in out  # printed first
    assert_one_line_error(code, err, "--transcript", "could not write")
    folder.mkdir()
    monkeypatch.setattr("hogwild_agents.cli.HogwildEngine.from_pretrained", load_then_lose_the_folder)
    code, out, err = run_cli([*argv, "--json", "--transcript", str(folder / "run.html")], capsys)
    assert json.loads(out)["workers"]  # the JSON result is complete on stdout
    assert_one_line_error(code, err, "could not write")


@pytest.mark.parametrize(
    ("options", "fragments"),
    [
        (["--tools", "shell"], ("unknown tool 'shell'",)),
        (["--protocol", "no_such_protocol"], ("Unknown protocol 'no_such_protocol'",)),
        (["--model", "/no/such/model"], ("does not exist",)),
        (["--model", "missing.gguf"], ("does not exist",)),
        (["--device", "tpu"], ("device",)),
        (["--dtype", "int8"], ("dtype",)),
        (["--workers", "0"], ("--workers",)),
        (["--workers", "2.5"], ("--workers",)),
        (["--workers", "65"], ("--workers",)),
        (["--max-tokens", "-3"], ("--max-tokens",)),
        (["--temperature", "nan"], ("--temperature",)),
        (["--temperature", "inf"], ("--temperature",)),
        (["--temperature", "-1"], ("--temperature",)),
        (["--top-p", "1.5"], ("--top-p",)),
        (["--seed", "abc"], ("--seed",)),
        (["--seed", str(2**64)], ("--seed",)),
        (["--layout", "spiral"], ("--layout",)),
        (["--attention", "magic"], ("--attention",)),
        (["--view", "3d"], ("--view",)),
    ],
)
def test_command_line_errors_are_one_line_messages(capsys, no_model_load, options, fragments):
    code, out, err = run_cli(["run", QUESTION, *options], capsys)
    assert_one_line_error(code, err, *fragments)
    assert out == ""


def test_template_and_model_load_errors_are_one_line_messages(capsys, tmp_path):
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% block system %}{{ unclosed {% endblock %}\n")
    code, _, err = run_cli(["run", QUESTION, "--protocol", str(broken)], capsys)
    assert_one_line_error(code, err, "broken.jinja", "line 1")
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    code, _, err = run_cli(["run", QUESTION, "--model", str(not_a_model)], capsys)
    assert_one_line_error(code, err, "Cannot load a model")
