"""Eval datasets: question/answer pairs from a JSONL file, or generated offline by `reasoning-gym`.

A JSONL dataset has one JSON object per line with a question and its answer. The question is read from
the first of QUESTION_FIELDS present, the answer from the first of ANSWER_FIELDS (or the fields you
name); an optional "id" names the problem (default: its line number). A GSM8K-style answer
("...reasoning... #### 72") keeps only the part after the last "####".

`gym:NAME` generates problems with reasoning-gym's generator NAME (e.g. `gym:countdown`,
`gym:basic_arithmetic`, `gym:gsm_symbolic`), seeded, without any download; generator options follow
as a query string, e.g. `gym:countdown?min_numbers=3&max_numbers=4`. Its answers are scored by the
generator's own scorer.

Samples are prefix-stable: `limit=N` with a given seed takes the first N problems of one fixed order,
so a larger limit extends a smaller one (and a resumed eval with a larger limit only adds problems).
"""

from __future__ import annotations

import difflib
import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from hogwild_agents.errors import EvalError

QUESTION_FIELDS = ("question", "problem", "prompt", "input", "query")
ANSWER_FIELDS = ("answer", "final_answer", "target", "gold", "expected", "output", "label")
GYM_PREFIX = "gym:"
DEFAULT_GYM_SIZE = 50  # problems generated when no limit is given
INSTALL_HINT = "install the eval extra: pip install 'hogwild-agents[eval]'"


@dataclass(frozen=True)
class Problem:
    """One question with its reference answer. `entry` is the generator's own record (its scorer's input)."""

    id: str
    question: str
    answer: str
    entry: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Dataset:
    """Problems in eval order. `scorer(answer, problem) -> score in [0, 1]` when the source has its own."""

    name: str
    problems: list[Problem]
    scorer: Callable[[str | None, Problem], float] | None = None


def load_dataset(
    spec: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    question_field: str | None = None,
    answer_field: str | None = None,
) -> Dataset:
    """The dataset `spec` names: a JSONL path or `gym:NAME[?option=value&...]`; at most `limit` problems."""
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be a positive number of problems, got {limit}.")
    if spec.startswith(GYM_PREFIX):
        if question_field or answer_field:
            raise EvalError("Field names apply to JSONL datasets only; gym generators name their own.")
        return _gym_dataset(spec, limit or DEFAULT_GYM_SIZE, seed)
    return _jsonl_dataset(Path(spec), limit, seed, question_field, answer_field)


# ---- JSONL ------------------------------------------------------------------------------------


def _jsonl_dataset(
    path: Path, limit: int | None, seed: int, question_field: str | None, answer_field: str | None
) -> Dataset:
    if not path.is_file():
        raise EvalError(
            f"Dataset {str(path)!r} is not a file. Give a JSONL file of question/answer objects or a "
            "generator as gym:NAME (e.g. gym:basic_arithmetic)."
        )
    problems: list[Problem] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise EvalError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
            if not isinstance(record, dict):
                raise EvalError(
                    f"{path}, line {number}: expected a JSON object, got {type(record).__name__}."
                )
            question = _field(record, question_field, QUESTION_FIELDS, "question", path, number)
            answer = _gold(_field(record, answer_field, ANSWER_FIELDS, "answer", path, number))
            problem_id = str(record.get("id", number))
            if problem_id in seen:
                raise EvalError(
                    f"{path}, line {number}: id {problem_id!r} is used twice; ids must be unique."
                )
            seen.add(problem_id)
            problems.append(Problem(problem_id, str(question), answer))
    if not problems:
        raise EvalError(f"{path} holds no problems (one JSON object per line expected).")
    return Dataset(str(path), _sample(problems, limit, seed))


def _field(
    record: dict, chosen: str | None, accepted: tuple[str, ...], what: str, path: Path, number: int
) -> Any:
    names = (chosen,) if chosen else accepted
    for name in names:
        value = record.get(name)
        if value is not None and str(value).strip():
            return value
    if chosen:
        hint = f"no non-empty field {chosen!r}"
    else:
        hint = f"no {what} field (accepted: {', '.join(accepted)}; or name it with --{what}-field)"
    raise EvalError(f"{path}, line {number}: {hint}; its fields are {sorted(record)}.")


def _gold(value: Any) -> str:
    """The reference answer as text; a GSM8K-style "... #### 72" keeps what follows the last ####."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def _sample(problems: list[Problem], limit: int | None, seed: int) -> list[Problem]:
    """The first `limit` problems of a seeded shuffle, back in file order (prefix-stable in `limit`)."""
    if limit is None or limit >= len(problems):
        return problems
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    return [problems[i] for i in sorted(order[:limit])]


# ---- reasoning-gym ----------------------------------------------------------------------------


def _gym_dataset(spec: str, size: int, seed: int) -> Dataset:
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError:
        raise EvalError(f"Dataset {spec!r} needs the reasoning-gym package; {INSTALL_HINT}.") from None
    name, _, query = spec[len(GYM_PREFIX) :].partition("?")
    options = {key: _option_value(value) for key, value in parse_qsl(query, keep_blank_values=True)}
    known = sorted(DATASETS)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known generators: {', '.join(known)}"
        raise EvalError(f"Unknown reasoning-gym generator {name!r}; {hint}")
    try:
        generator = reasoning_gym.create_dataset(name, size=size, seed=seed, **options)
    except (TypeError, ValueError, AssertionError) as err:
        raise EvalError(f"reasoning-gym generator {name!r} rejected options {options}: {err}") from None

    def scorer(answer: str | None, problem: Problem) -> float:
        return 0.0 if answer is None else float(generator.score_answer(answer, entry=dict(problem.entry)))

    entries = (generator[i] for i in range(len(generator)))
    problems = [Problem(str(i), e["question"], str(e["answer"]), e) for i, e in enumerate(entries)]
    return Dataset(spec, problems, scorer)


def _option_value(text: str) -> Any:
    """A generator option from its query-string text: JSON when it parses (numbers, lists), else text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
