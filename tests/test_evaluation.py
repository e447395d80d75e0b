"""`hogwild eval`: datasets, checkers, the grid, the resumable runner and the command end to end."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
import textwrap
import zlib

import pytest

from hogwild_agents.cli import main
from hogwild_agents.engine import HogwildEngine
from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation import (
    Config,
    EvalSettings,
    ResultStore,
    build_grid,
    load_dataset,
    make_checker,
    run_grid,
)
from hogwild_agents.evaluation.checkers import majority, normalise, parse_number
from hogwild_agents.evaluation.datasets import Dataset, Problem
from hogwild_agents.evaluation.runner import protocol_fingerprint, run_batch, run_eval
from hogwild_agents.protocol import Protocol
from tests.eval_helpers import PROBLEMS, CountingEngine, FakeEngine, right, tiny_eval

# ---- checkers ---------------------------------------------------------------------------------


def _problem(answer: str) -> Problem:
    return Problem("p", "q?", answer)


def _checker(kind: str, *answers: str, tolerance: float = 1e-6):
    return make_checker(kind, Dataset("d", [_problem(a) for a in answers or ("1",)]), tolerance)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7", 7.0),
        ("-7.50", -7.5),
        ("1,234,567", 1234567.0),
        ("\\boxed{42}", 42.0),
        ("$12$", 12.0),
        ("\\frac{1}{4}", 0.25),
        ("\\dfrac{3}{4}", 0.75),
        ("3/4", 0.75),
        ("50%", 50.0),
        ("x = 7", 7.0),
        ("7 apples", 7.0),
        ("\\text{7 km}", 7.0),
        ("**9**.", 9.0),
        ("1e3", 1000.0),
        ("3 + 4", None),
        ("2 or 3", None),
        ("seven", None),
        ("1/0", None),
        ("inf", None),
    ],
)
def test_numbers_are_read_from_answers(text, value):
    assert parse_number(text) == value


def test_the_numeric_checker_compares_within_its_tolerance():
    checker = _checker("numeric", "3.14159")
    gold = _problem("3.14159")
    assert checker.score("3.14159", gold) == 1.0
    assert checker.score("3.1416", gold) == 0.0
    assert _checker("numeric", "3.14159", tolerance=1e-4).score("3.1416", gold) == 1.0
    assert checker.score(None, gold) == 0.0
    assert _checker("numeric", "0.5").score("\\frac{1}{2}", _problem("0.5")) == 1.0
    assert _checker("numeric", "1200").score("1,200", _problem("1200")) == 1.0


def test_the_numeric_checker_refuses_references_that_are_no_number():
    with pytest.raises(EvalError, match=r"cannot read the reference answer 'Paris'.*--checker exact"):
        _checker("numeric", "7", "Paris")


def test_the_exact_checker_compares_normalised_text():
    checker = _checker("exact", "Paris")
    gold = _problem("Paris")
    for answer in ("Paris", "paris.", "\\text{Paris}", "**Paris**", " 'Paris' ", "$Paris$"):
        assert checker.score(answer, gold) == 1.0, answer
    assert checker.score("Lyon", gold) == 0.0
    assert normalise("New   York\n City") == "new york city"


def test_auto_checks_numbers_numerically_and_text_exactly():
    checker = _checker("auto", "7", "Paris")
    assert checker.score("7.0", _problem("7")) == 1.0
    assert checker.score("paris", _problem("Paris")) == 1.0
    assert checker.score("7.0", _problem("7 apples")) == 0.0  # a reference that is no plain number


def test_a_majority_vote_counts_equal_answers_together_and_breaks_ties_by_order():
    checker = _checker("auto", "7")
    gold = _problem("7")
    assert majority(["6", "7", "7.0", None], checker, gold) == "7"
    assert majority(["6", "7"], checker, gold) == "6"
    assert majority([None, None], checker, gold) is None
    assert majority(["Paris", "paris", "Lyon"], checker, _problem("Paris")) == "Paris"


def test_unknown_checkers_and_gym_on_files_are_refused():
    with pytest.raises(EvalError, match="Unknown checker 'fuzzy'"):
        _checker("fuzzy")
    with pytest.raises(EvalError, match="no scorer of its own"):
        _checker("gym")


# ---- datasets ---------------------------------------------------------------------------------


def _jsonl(tmp_path, *records, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    return str(path)


def test_jsonl_datasets_accept_common_field_names(tmp_path):
    path = _jsonl(
        tmp_path,
        {"question": "What is 3 + 4?", "answer": "7"},
        {"problem": "What is 10 - 6?", "target": 4, "id": "sub"},
        "",
        {"prompt": "Tom has 3 apples ...", "answer": "He has 3 + 2 = 5.\n#### 5"},
        {"input": "Capital of France?", "expected": "Paris"},
    )
    dataset = load_dataset(path)
    assert [(p.id, p.question[:7], p.answer) for p in dataset.problems] == [
        ("1", "What is", "7"),
        ("sub", "What is", "4"),
        ("4", "Tom has", "5"),
        ("5", "Capital", "Paris"),
    ]
    assert dataset.scorer is None and make_checker("auto", dataset).kind == "auto"


def test_jsonl_errors_say_what_is_wrong_and_where(tmp_path):
    with pytest.raises(
        EvalError, match=r"line 2: no answer field \(accepted: answer, final_answer.*--answer-field"
    ):
        load_dataset(_jsonl(tmp_path, {"question": "a", "answer": 1}, {"question": "b", "solution": "2"}))
    with pytest.raises(EvalError, match="line 1: not valid JSON"):
        load_dataset(_jsonl(tmp_path, "{question: 1}"))
    with pytest.raises(EvalError, match="id 'x' is used twice"):
        load_dataset(
            _jsonl(tmp_path, {"id": "x", "q": "a", "a": "1"}, {"id": "x", "q": "b", "a": "2"}),
            question_field="q",
            answer_field="a",
        )
    with pytest.raises(EvalError, match=r"is not a file.*gym:NAME"):
        load_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(EvalError, match="--limit must be a positive"):
        load_dataset(_jsonl(tmp_path, {"question": "a", "answer": 1}), limit=0)
    named = load_dataset(
        _jsonl(tmp_path, {"q": "a", "solution": "2"}), question_field="q", answer_field="solution"
    )
    assert named.problems == [Problem("1", "a", "2")]


def test_a_limited_sample_is_seeded_and_grows_by_extension(tmp_path):
    path = _jsonl(tmp_path, *({"question": f"q{i}", "answer": str(i)} for i in range(30)))
    five = [p.id for p in load_dataset(path, limit=5, seed=3).problems]
    assert five == [p.id for p in load_dataset(path, limit=5, seed=3).problems]
    assert five != [p.id for p in load_dataset(path, limit=5, seed=4).problems]
    assert set(five) < {p.id for p in load_dataset(path, limit=10, seed=3).problems}
    assert five == sorted(five, key=int)  # file order


def test_reasoning_gym_generators_come_with_their_own_scorer():
    dataset = load_dataset("gym:basic_arithmetic", limit=3, seed=1)
    assert len(dataset.problems) == 3 and dataset.name == "gym:basic_arithmetic"
    longer = load_dataset("gym:basic_arithmetic", limit=5, seed=1)
    assert [p.question for p in longer.problems[:3]] == [p.question for p in dataset.problems]
    checker = make_checker("auto", dataset)
    assert checker.kind == "gym"
    problem = dataset.problems[0]
    assert checker.score(problem.answer, problem) == 1.0
    assert checker.score(str(int(problem.answer) + 1), problem) < 1.0
    assert checker.score(None, problem) == 0.0
    countdown = load_dataset("gym:countdown?min_numbers=3&max_numbers=3", limit=2, seed=0)
    assert all(len(p.entry["metadata"]["numbers"]) == 3 for p in countdown.problems)


def test_reasoning_gym_errors_name_the_generator():
    with pytest.raises(EvalError, match="did you mean countdown"):
        load_dataset("gym:countdwn", limit=1)
    with pytest.raises(EvalError, match="rejected options"):
        load_dataset("gym:countdown?bogus=3", limit=1)


def test_the_core_imports_without_the_eval_extra(tmp_path):
    """matplotlib and reasoning-gym are optional: without them the CLI imports, JSONL evals load, and
    what needs them says how to install it."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["matplotlib"] = sys.modules["reasoning_gym"] = None  # import fails
        import hogwild_agents.cli
        from hogwild_agents.errors import EvalError
        from hogwild_agents.evaluation import load_dataset
        from hogwild_agents.evaluation.report import plot_png
        assert load_dataset({_jsonl(tmp_path, {"question": "a", "answer": 1})!r}).problems
        for call in (lambda: load_dataset("gym:countdown"), lambda: plot_png([])):
            try:
                call()
            except EvalError as err:
                assert "pip install 'hogwild-agents[eval]'" in str(err), err
            else:
                raise AssertionError("no error")
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


# ---- the grid ---------------------------------------------------------------------------------


def test_the_grid_holds_every_configuration_and_the_baselines_once():
    grid = build_grid([1, 2, 4], ["collaborate", "check_redundancy"], ["combined", "interleaved"])
    assert [c.name for c in grid] == [
        "single/collaborate",
        "hogwild-combined-x2/collaborate",
        "msgpass-x2/collaborate",
        "hogwild-combined-x2/check_redundancy",
        "msgpass-x2/check_redundancy",
        "reprefill-x2/collaborate",
        "vote-x2/collaborate",
        "hogwild-combined-x4/collaborate",
        "msgpass-x4/collaborate",
        "hogwild-combined-x4/check_redundancy",
        "msgpass-x4/check_redundancy",
        "reprefill-x4/collaborate",
        "vote-x4/collaborate",
    ]
    assert Config("vote", 4, "collaborate").label == "Vote of 4 \u00b7 collaborate"
    assert [c.name for c in build_grid([2], ["vote"], ["contiguous"], [])] == ["hogwild-contiguous-x2/vote"]


def test_runs_are_shared_between_configurations():
    single, vote2, vote4 = Config("single", 1, "p"), Config("vote", 2, "p"), Config("vote", 4, "p")
    assert single.runs(8) == vote2.runs(8)[:1] and vote2.runs(8) == vote4.runs(8)[:2]
    assert len({*vote4.runs(8), *vote4.runs(16)}) == 8
    assert not set(vote4.runs(8, seed=0)) & set(vote4.runs(8, seed=1))
    assert Config("msgpass", 2, "p", "interleaved").runs(8)[0].layout == "interleaved"
    assert Config("reprefill", 2, "p", "reprefill").runs(8)[0].layout == "reprefill"
    assert "re-prefill" in Config("reprefill", 2, "p").label
    assert "idealised" in Config("msgpass", 2, "p").label


def test_bad_grids_are_refused():
    with pytest.raises(EvalError, match="--workers"):
        build_grid([0, 2], ["collaborate"], ["combined"])
    with pytest.raises(EvalError, match="--layouts"):
        build_grid([2], ["collaborate"], ["diagonal"])
    with pytest.raises(EvalError, match="Unknown baseline"):
        build_grid([2], ["collaborate"], ["combined"], ["oracle"])
    with pytest.raises(EvalError, match="--temperature > 0"):
        EvalSettings(budgets=(4,), temperature=0.0).check(build_grid([2], ["collaborate"], ["combined"]))
    with pytest.raises(EvalError, match="--budgets"):
        EvalSettings(budgets=(0,)).check([])


# ---- the runner -------------------------------------------------------------------------------


def test_run_batch_submits_every_job_at_once_and_falls_back_to_generate(smol_engine):
    engine = CountingEngine(smol_engine, many=True)
    jobs = [
        ([{"role": "user", "content": p.question}], {"max_new_tokens": 2, "n_workers": 1}) for p in PROBLEMS
    ]
    timed = run_batch(engine, jobs)
    assert len(engine.calls) == 2 and len(timed) == 2 and all(wall > 0 for _, wall in timed)
    plain = CountingEngine(FakeEngine())
    results = run_batch(plain, [([{"role": "user", "content": "What is 3 + 4?"}], {"max_new_tokens": 2})] * 3)
    assert len(plain.calls) == 3 and len(results) == 3


def _runs(db):
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT problem, n_workers, layout, budget, seed, sample, run_seed, transcript FROM runs"
        ).fetchall()


def test_an_eval_stores_one_row_per_problem_configuration_and_budget(tmp_path):
    engine = CountingEngine(FakeEngine())
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = tiny_eval(engine, store)
        configs = store.configs()
    assert [c.name for c in configs] == [
        "single/collaborate",
        "hogwild-combined-x2/collaborate",
        "msgpass-x2/collaborate",
        "vote-x2/collaborate",
    ]
    assert len(rows) == 2 * 4 * 2
    # runs shared: single = the vote's first sample, so 4 runs per problem and budget, not 5
    assert len(engine.calls) == len(set(engine.calls)) == 2 * 4 * 2
    seeds = {
        (p, n, layout, b, sample): run_seed
        for p, n, layout, b, _, sample, run_seed, _ in _runs(tmp_path / "r.sqlite")
    }
    assert len(set(seeds.values())) == len(seeds)  # every run its own stream
    name = {c.key: c.name for c in configs}
    by_key = {(r.problem, name[r.config], r.budget): r for r in rows}
    gold = {"a": "7", "b": "10"}
    for (problem, config, budget), row in by_key.items():
        if config.startswith("single"):
            ok = right(seeds[problem, 1, "combined", budget, 0], 1, budget)
            assert row.samples == ((gold[problem] if ok else gold[problem] + "1"),) and row.correct == ok
    vote = by_key["a", "vote-x2/collaborate", 3]
    samples = tuple("7" if right(seeds["a", 1, "combined", 3, k], 1, 3) else "71" for k in range(2))
    assert (
        vote.samples == samples and vote.answer == samples[0] and vote.correct == (samples[0] == "7")
    )  # a tie: the first
    assert by_key["a", "single/collaborate", 3].samples == samples[:1]
    # a vote: the tokens of both samples, the forward passes and the wall time of the longest
    assert (vote.tokens, vote.forward_passes, vote.forward_tokens) == (6, 5, 6)  # after the prompts
    single = by_key["a", "single/collaborate", 3]
    assert vote.wall_s >= single.wall_s > 0
    hogwild = by_key["b", "hogwild-combined-x2/collaborate", 2]
    assert (hogwild.tokens, hogwild.forward_passes) == (4, 4)
    assert hogwild.correct == right(seeds["b", 2, "combined", 2, 0], 2, 2)
    assert all(row.correct == (row.score == 1.0) and row.finish_reason == "length" for row in rows)


def test_replicate_seeds_share_no_sampled_run(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = tiny_eval(FakeEngine(), store, seeds=(1, 2))
    assert len(rows) == 2 * 4 * 2 * 2 and {r.seed for r in rows} == {1, 2}
    runs = _runs(tmp_path / "r.sqlite")
    by_seed = {seed: [r for r in runs if r[4] == seed] for seed in (1, 2)}
    assert len(by_seed[1]) == len(by_seed[2]) == 16
    assert not {r[6] for r in by_seed[1]} & {r[6] for r in by_seed[2]}  # derived seeds
    assert not {r[7] for r in by_seed[1]} & {r[7] for r in by_seed[2]}  # transcripts
    # --seeds 2 alone makes the runs --seeds 1,2 made for seed 2, none of seed 1's
    with ResultStore(tmp_path / "two.sqlite") as store:
        tiny_eval(FakeEngine(), store, seeds=(2,))
    assert {r[6] for r in _runs(tmp_path / "two.sqlite")} == {r[6] for r in by_seed[2]}


def test_an_edited_template_is_computed_again(tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text('{% extends "collaborate" %}')
    engine = CountingEngine(FakeEngine())
    with ResultStore(tmp_path / "r.sqlite") as store:
        first = tiny_eval(engine, store, budgets=(2,), protocols=(str(template),))
        calls = len(engine.calls)
        assert (
            tiny_eval(engine, store, budgets=(2,), protocols=(str(template),)) and len(engine.calls) == calls
        )
        template.write_text('{% extends "collaborate" %}{% block system %}Be brief.{% endblock %}')
        second = tiny_eval(engine, store, budgets=(2,), protocols=(str(template),))
        current = {c.key for c in store.configs()}
    assert len(engine.calls) == 2 * calls  # everything ran again
    assert {r.config for r in first}.isdisjoint(current)  # the old rows are not the current ones
    assert len([r for r in second if r.config in current]) == len(first)
    # keyed by the text, not the path
    copy = tmp_path / "copy" / "mine.jinja"
    copy.parent.mkdir()
    copy.write_text(template.read_text())
    assert protocol_fingerprint(Protocol(str(copy))) == protocol_fingerprint(Protocol(str(template)))
    assert protocol_fingerprint(Protocol(str(copy))) != protocol_fingerprint(Protocol("collaborate"))


def test_a_protocol_object_and_no_protocol_run(tmp_path):
    protocol = Protocol("collaborate", interjection_period=64)
    dataset = Dataset("tiny", PROBLEMS)
    configs = build_grid([1, 2], [protocol], ["combined"], ["single", "vote"], baseline_protocol="none")
    assert [c.method for c in configs] == ["single", "hogwild", "vote"]
    engine = CountingEngine(FakeEngine())
    with ResultStore(tmp_path / "r.sqlite") as store:
        rows = run_eval_quiet(engine, dataset, configs, store)
        names = [c.name for c in store.configs()]
    assert names == ["single/none", "hogwild-combined-x2/collaborate", "vote-x2/none"]
    assert len(rows) == 2 * 3 and all(r.answer is not None for r in rows)  # \\boxed read from plain text


def run_eval_quiet(engine, dataset, configs, store, **settings):
    from hogwild_agents.evaluation import run_eval

    options = {"budgets": (2,), **settings}
    return run_eval(
        engine,
        dataset,
        configs,
        EvalSettings(**options),
        store,
        make_checker("auto", dataset),
        progress=False,
    )


def test_resuming_with_other_settings_is_refused_before_the_model_loads(tmp_path):
    def loader():
        raise AssertionError("the model must not load")

    with ResultStore(tmp_path / "r.sqlite") as store:
        tiny_eval(FakeEngine(), store, budgets=(2,), model="fake-model")
        with pytest.raises(EvalError, match=r"temperature: database '0\.6', now '0\.7'"):
            tiny_eval(loader, store, budgets=(2,), temperature=0.7, model="fake-model")
        with pytest.raises(EvalError, match=r"model: database 'fake-model', now 'other'"):
            tiny_eval(loader, store, budgets=(2,), model="other")
        assert len(tiny_eval(loader, store, budgets=(2,), model="fake-model")) == 8  # all stored: no load


def test_an_interrupted_eval_resumes_without_computing_a_row_twice(tmp_path):
    db = tmp_path / "r.sqlite"
    first = CountingEngine(FakeEngine())
    stored = []

    def interrupt(row):
        stored.append(row)
        if len(stored) == 5:
            raise KeyboardInterrupt

    with ResultStore(db) as store, pytest.raises(KeyboardInterrupt):
        tiny_eval(first, store, on_row=interrupt, batch_size=1)
    with ResultStore(db) as store:
        before = {(r.problem, r.config, r.budget, r.seed): r for r in store.results()}
    assert len(before) == 5
    second = CountingEngine(FakeEngine())
    with ResultStore(db) as store:
        rows = tiny_eval(second, store, batch_size=1)
    assert len(rows) == 16
    assert not set(first.calls) & set(second.calls)  # no run made twice
    assert len(first.calls) + len(second.calls) == 16  # the unique runs of the grid
    after = {(r.problem, r.config, r.budget, r.seed): r for r in rows}
    assert all(after[key] == row for key, row in before.items())  # stored rows were kept as they were
    third = CountingEngine(FakeEngine())
    with ResultStore(db) as store:
        assert len(tiny_eval(third, store, batch_size=1)) == 16 and third.calls == []


def test_a_database_refuses_an_eval_with_other_settings(tmp_path):
    with ResultStore(tmp_path / "r.sqlite") as store:
        tiny_eval(FakeEngine(), store, budgets=(2,))
        with pytest.raises(EvalError, match=r"temperature: database '0\.6', now '0\.7'.*another --db"):
            tiny_eval(FakeEngine(), store, budgets=(2,), temperature=0.7)
    with pytest.raises(EvalError, match="not a usable results database"):
        (tmp_path / "junk.sqlite").write_text("not sqlite" * 100)
        ResultStore(tmp_path / "junk.sqlite")


def test_eval_runs_end_to_end_on_the_embedded_model(smol_engine, tmp_path, monkeypatch, capsys):
    """The command on the embedded model: a one-problem dataset, every method, then the report."""
    engine = CountingEngine(smol_engine, many=True)
    monkeypatch.setattr(HogwildEngine, "from_pretrained", classmethod(lambda cls, *a, **k: engine))
    data = _jsonl(tmp_path, {"question": "What is 3 + 4?", "answer": "7"})
    out = tmp_path / "out"
    argv = ["eval", data, "--workers", "1,2", "--budgets", "40", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "Vote of 2" in text and "Message passing" in text and f"report: {out / 'report.html'}" in text
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT config, answer, tokens, forward_passes FROM results").fetchall()
        runs = db.execute("SELECT n_workers, layout, sample, generated_tokens FROM runs").fetchall()
    assert len(rows) == 5
    assert sorted((n, layout, seed) for n, layout, seed, _ in runs) == [
        (1, "combined", 0),
        (1, "combined", 1),
        (2, "combined", 0),
        (2, "interleaved", 0),
        (2, "reprefill", 0),
    ]
    assert all(0 < passes <= 40 and tokens > 0 for _, _, tokens, passes in rows)
    assert any(answer is not None for _, answer, _, _ in rows)  # the finisher gets an answer out
    assert (out / "accuracy.png").stat().st_size > 10_000
    with sqlite3.connect(out / "results.sqlite") as db:
        page = zlib.decompress(db.execute("SELECT transcript FROM runs").fetchone()[0]).decode()
    prompt = page.split("<h2>Prompt</h2>", 1)[1].split("</pre>", 1)[0]
    assert "im_start" in prompt and "What is 3 + 4?" in prompt  # the full prompt, chat template included
    assert len(engine.calls) == 4  # the re-prefill agents run on their own driver, not `generate`
    assert main(argv) == 0
    assert len(engine.calls) == 4  # everything is stored: nothing runs again
    with pytest.raises(SystemExit, match=r"temperature: database '0\.6', now '0\.9'"):
        main([*argv, "--temperature", "0.9"])  # refused before the model loads
    with pytest.raises(SystemExit, match="hogwild eval: Unknown protocol 'nope'"):
        main(["eval", data, "--protocols", "nope", "--out", str(out)])


def test_run_grid_returns_one_row_per_problem_configuration_budget_and_seed(tmp_path, capsys):
    dataset = Dataset("tiny", PROBLEMS)
    configs = build_grid([1, 2], ["collaborate"], ["combined"], ["single", "vote", "msgpass"])
    settings = EvalSettings(budgets=(2, 3), seeds=(0, 5))
    db = tmp_path / "r.sqlite"
    frame = run_grid(FakeEngine(), dataset, configs, settings, db=db)
    assert len(frame) == 2 * 4 * 2 * 2
    keys = set(zip(frame.problem, frame.config, frame.budget, frame.seed, strict=True))
    assert len(keys) == len(frame)
    assert set(frame.seed) == {0, 5} and set(frame.budget) == {2, 3} and set(frame.problem) == {"a", "b"}
    assert set(frame.method) == {"single", "hogwild", "msgpass", "vote"}
    assert (frame.correct == (frame.reference == frame.answer)).all()
    smaller = run_grid(FakeEngine(), dataset, configs[:1], EvalSettings(budgets=(2,), seeds=(5,)), db=db)
    assert len(smaller) == 2 and set(smaller.seed) == {5}  # only the grid asked for
    assert len(run_grid(FakeEngine(), dataset, configs[:1], EvalSettings(budgets=(2,)))) == 2  # in memory
    csv_path = tmp_path / "rows.csv"
    assert main(["eval-report", str(db), "--csv", str(csv_path)]) == 0
    with open(csv_path, newline="") as file:
        exported = list(csv.DictReader(file))
    assert len(exported) == len(frame) and exported[0].keys() == set(frame.columns)
    assert sorted(r["answer"] for r in exported) == sorted(frame.answer)
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install pyarrow"):
            main(["eval-report", str(db), "--parquet", str(tmp_path / "rows.parquet")])


def test_every_method_stays_within_its_forward_pass_budget(tiny_engines, tmp_path):
    """One x-grid: at each forward-pass budget every method's runs take at most that many forwards
    (headers, re-prefills and the finisher included), and re-prefilling embeds more than sharing."""
    engine = tiny_engines["llama"]
    dataset = Dataset("tiny", PROBLEMS[:1])
    configs = build_grid([1, 2], ["collaborate"], ["combined", "contiguous", "interleaved"])
    assert {c.method for c in configs} == {"single", "hogwild", "msgpass", "reprefill", "vote"}
    settings = EvalSettings(budgets=(6, 48), sync_every=8, budget_unit="forwards")
    with ResultStore(tmp_path / "r.sqlite") as store:
        checker = make_checker("auto", dataset)
        rows = run_eval(engine, dataset, configs, settings, store, checker, model="tiny", progress=False)
        runs = store.db.execute("SELECT layout, budget, forward_passes FROM runs").fetchall()
        assert store.meta()["budget_unit"] == "forwards"
    assert len(rows) == len(configs) * 2
    assert all(0 < row.forward_passes <= row.budget for row in rows)
    assert {layout for layout, _, _ in runs} == {"combined", "contiguous", "interleaved", "reprefill"}
    assert all(0 < passes <= budget for _, budget, passes in runs)
    by_config = {(row.config.split("@")[0], row.budget): row for row in rows}
    shared = by_config["hogwild-combined-x2/collaborate", 48]
    assert by_config["reprefill-x2/collaborate", 48].forward_tokens > shared.forward_tokens
    with pytest.raises(EvalError, match="at least 2"):
        EvalSettings(budgets=(1,)).check(configs)
    with pytest.raises(EvalError, match="budget-unit"):
        EvalSettings(budgets=(8,), budget_unit="steps").check(configs)


def test_checkpointed_budgets_give_the_answers_of_runs_stopped_at_each_budget(tiny_engines, tmp_path):
    """One run per (problem, configuration, seed) read at every budget on its way: each budget's stored
    run equals a run capped there with the same seed (answer, tokens and forward passes)."""
    engine = CountingEngine(tiny_engines["llama"], many=True)
    dataset = Dataset("tiny", PROBLEMS[:1])
    configs = build_grid([1, 2], ["collaborate"], ["combined"], ["single", "vote", "msgpass"])
    settings = EvalSettings(budgets=(36, 50, 80), checkpoints=True, temperature=0.8)
    with ResultStore(tmp_path / "r.sqlite") as store:
        checker = make_checker("auto", dataset)
        rows = run_eval(engine, dataset, configs, settings, store, checker, model="tiny", progress=False)
        stored = [(c.key, b, c.runs(b)) for c in store.configs() for b in (36, 50, 80)]
        runs = {(key, b): [store.run("a", spec) for spec in specs] for key, b, specs in stored}
        assert store.meta()["checkpoints"] == "True"
    assert len(engine.calls) == 4  # single (= vote sample 0), vote sample 1, hogwild, msgpass: once each
    assert len(rows) == len(configs) * 3
    protocol = Protocol("collaborate")
    for (key, budget), records in runs.items():
        for record in records:
            spec = record.spec
            capped = tiny_engines["llama"].generate(
                [{"role": "user", "content": PROBLEMS[0].question}], n_workers=spec.n_workers,
                layout=spec.layout, protocol=protocol, max_new_tokens=budget, max_forward_passes=budget,
                temperature=0.8, seed=spec.run_seed("a", checkpointed=True),
            )  # fmt: skip
            assert record.run_seed == spec.run_seed("a", checkpointed=True)
            assert (record.answer, record.generated_tokens, record.forward_passes) == (
                capped.answer,
                capped.usage.generated_tokens,
                capped.forward_passes,
            ), (key, budget)
    with pytest.raises(EvalError, match="checkpoints"):
        EvalSettings(budgets=(8,), budget_unit="tokens", checkpoints=True).check(configs)
