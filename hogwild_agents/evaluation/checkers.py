"""Checkers: how an extracted answer is scored against a problem's reference answer.

- `numeric`: both sides read as numbers (LaTeX fractions, thousands separators, units and `$` signs
  tolerated) and compared with a relative/absolute tolerance.
- `exact`: the normalised strings are equal (case, spaces, `\\boxed{}`, `\\text{}`, `$`, markdown bold
  and a trailing period ignored).
- `gym`: the generator's own scorer (reasoning-gym datasets).
- `auto` (default): `gym` for a generator; else, per problem, `numeric` when the reference answer is a
  number and `exact` otherwise.

A score lies in [0, 1]; an answer is correct when its score is 1 (some generators give partial credit).
`Checker.key` groups answers that count as the same for a majority vote.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation.datasets import Dataset, Problem

CHECKERS = ("auto", "numeric", "exact", "gym")
DEFAULT_TOLERANCE = 1e-6

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(_NUM)
_FRACTION = re.compile(rf"\(?\s*({_NUM})\s*\)?\s*/\s*\(?\s*({_NUM})\s*\)?")
_TEXT_COMMAND = re.compile(r"\\(?:text|mathrm|textbf|mathbf|textit|operatorname)\s*\{([^{}]*)\}")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
_BOXED = re.compile(r"\s*\\boxed\s*\{(.*)\}\s*", re.DOTALL)


def _unwrap(text: str) -> str:
    """Text without surrounding `\\boxed{}`, `\\text{}`-style commands, `$`, backticks and bold marks."""
    text = unicodedata.normalize("NFKC", text).replace("\u2212", "-")
    while (match := _BOXED.fullmatch(text)) is not None:
        text = match.group(1)
    text = _TEXT_COMMAND.sub(r"\1", text)
    for mark in ("\\$", "$", "**", "`", "\\!", "\\,", "\\;"):
        text = text.replace(mark, "")
    return text.strip()


def normalise(text: str) -> str:
    """The text `exact` compares: unwrapped, quotes and a trailing period dropped, spaces collapsed,
    lower case."""
    text = _unwrap(text).strip().strip("\"'").strip().rstrip(".").strip()
    return re.sub(r"\s+", " ", text).lower()


def _as_number(text: str) -> float | None:
    """`text` as a number when it is one (a decimal, a fraction a/b, a percentage), else None."""
    text = text.strip().removesuffix("\\%").removesuffix("%").strip()
    if (match := _FRACTION.fullmatch(text)) is not None:
        numerator, denominator = float(match.group(1)), float(match.group(2))
        return numerator / denominator if denominator else None
    if _NUMBER.fullmatch(text) is None:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _number_text(text: str) -> str:
    text = _unwrap(text)
    text = _LATEX_FRACTION.sub(r"(\1)/(\2)", text)
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators: 1,234,567
    return text.strip().rstrip(".").strip()


def as_number(text: str) -> float | None:
    """The answer's value when the whole answer is a number (after unwrapping), else None."""
    return _as_number(_number_text(text))


def parse_number(text: str) -> float | None:
    """The number an answer gives: the whole answer, else what follows its last "=", else its only
    number (so "7 apples" is 7, but "3 + 4" and "2 or 3" are no number)."""
    text = _number_text(text)
    value = _as_number(text)
    if value is None and "=" in text:
        value = _as_number(text.rsplit("=", 1)[1])
    if value is None:
        found = _NUMBER.findall(text)
        value = float(found[0]) if len(found) == 1 else None
    return value


@dataclass(frozen=True)
class Checker:
    """Scores answers of one dataset. `kind`: auto, numeric, exact or gym (see the module docstring)."""

    kind: str
    dataset: Dataset
    tolerance: float = DEFAULT_TOLERANCE

    def score(self, answer: str | None, problem: Problem) -> float:
        """The answer's score in [0, 1]; a missing answer scores 0."""
        if answer is None:
            return 0.0
        if self.kind == "gym":
            return self.dataset.scorer(answer, problem)
        if self._is_numeric(problem):
            return float(self._numeric(answer, problem.answer))
        return float(normalise(answer) == normalise(problem.answer))

    def _is_numeric(self, problem: Problem) -> bool:
        return self.kind == "numeric" or (self.kind == "auto" and as_number(problem.answer) is not None)

    def _numeric(self, answer: str, gold: str) -> bool:
        expected, value = parse_number(gold), parse_number(answer)
        return (
            expected is not None
            and value is not None
            and math.isclose(value, expected, rel_tol=self.tolerance, abs_tol=self.tolerance)
        )

    def key(self, answer: str, problem: Problem) -> Hashable:
        """What a majority vote counts: the value for numbers (within 1e-9), else the normalised text."""
        if self._is_numeric(problem):
            value = parse_number(answer)
            if value is not None:
                return round(value, 9)
        return normalise(answer)


def make_checker(name: str, dataset: Dataset, tolerance: float = DEFAULT_TOLERANCE) -> Checker:
    """The checker `name` (one of CHECKERS) for `dataset`; "auto" picks per dataset (see above)."""
    if name not in CHECKERS:
        raise EvalError(f"Unknown checker {name!r}; choose one of {', '.join(CHECKERS)}.")
    if tolerance < 0:
        raise EvalError(f"The tolerance must be >= 0, got {tolerance}.")
    if name == "gym" and dataset.scorer is None:
        raise EvalError(f"Dataset {dataset.name!r} has no scorer of its own; use numeric or exact.")
    if name == "numeric":
        unreadable = [p for p in dataset.problems if parse_number(p.answer) is None]
        if unreadable:
            raise EvalError(
                f"The numeric checker cannot read the reference answer {unreadable[0].answer!r} of problem "
                f"{unreadable[0].id!r} as a number ({len(unreadable)} such); use --checker exact or auto."
            )
    if name == "auto" and dataset.scorer is not None:
        name = "gym"
    return Checker(name, dataset, tolerance)


def majority(answers: Sequence[str | None], checker: Checker, problem: Problem) -> str | None:
    """The most frequent answer (by `checker.key`); ties go to the one given first; None when none."""
    given = [a for a in answers if a is not None]
    if not given:
        return None
    counts = Counter(checker.key(a, problem) for a in given)
    best = max(counts.values())
    return next(a for a in given if counts[checker.key(a, problem)] == best)
