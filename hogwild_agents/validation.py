"""Checks of option and input values at the library's boundary, each failing with an InvalidArgumentError
that names the option, what was given and what to pass instead."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

from hogwild_agents.errors import InvalidArgumentError

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def integer(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int (bools, floats and strings are refused) within [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InvalidArgumentError(f"{name} must be {_range_text(minimum, maximum)}, got {value}.")
    return value


def positive_integer(value: Any, name: str, maximum: int | None = None) -> int:
    return integer(value, name, 1, maximum)


def real(value: Any, name: str, what: str = "a finite number") -> float:
    """`value` as a finite float (bools, strings, nan and infinities are refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(f"{name} must be {what}, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise InvalidArgumentError(f"{name} must be {what}, got {value}.")
    return value


def timeout(value: Any, name: str, optional: bool = True) -> float | None:
    """A finite number of seconds > 0, or (when `optional`) None for no limit."""
    if value is None and optional:
        return None
    what = "a finite number of seconds > 0" + (" (None for no limit)" if optional else "")
    seconds = real(value, name, what)
    if seconds <= 0:
        raise InvalidArgumentError(f"{name} must be {what}, got {value}.")
    return seconds


def seed(value: Any) -> int | None:
    """None (a fresh random seed) or an int a torch generator takes."""
    return None if value is None else integer(value, "seed", SEED_RANGE[0], SEED_RANGE[1] - 1)


def stop_strings(stop: str | Iterable[str] | None) -> tuple[str, ...]:
    """Stop strings as a tuple; empty strings are refused (every worker would stop at once)."""
    items = (stop,) if isinstance(stop, str) else tuple(stop or ())
    for item in items:
        if not isinstance(item, str):
            raise InvalidArgumentError(f"stop strings must be strings, got {item!r} ({type(item).__name__}).")
        if not item:
            raise InvalidArgumentError(
                "stop strings must not be empty (an empty string matches at once, so every worker would "
                "stop after one token); leave it out, or pass stop=None for no stop strings."
            )
        text(item, "a stop string")
    return items


def text(value: str, name: str) -> str:
    """`value` if it is valid Unicode text (no lone surrogates, which no tokenizer can encode)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgumentError(
            f"{name} holds a lone surrogate {value[error.start]!r} at index {error.start}, which is not "
            "valid Unicode text; remove it (e.g. text.encode('utf-8', 'replace').decode())."
        ) from None
    return value


def token_ids(ids: Sequence[Any], vocab_size: int, name: str) -> list[int]:
    """Token ids as ints, each in [0, vocab_size)."""
    result = []
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise InvalidArgumentError(
                f"{name}: item {i} is {token!r} ({type(token).__name__}), not a token id (an int)."
            )
        if not 0 <= token < vocab_size:
            raise InvalidArgumentError(
                f"{name}: token id {int(token)} (item {i}) is outside the model's vocabulary "
                f"[0, {vocab_size})."
            )
        result.append(int(token))
    return result


def choice(value: Any, allowed: Sequence[str], name: str) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidArgumentError(f"Unknown {name} {value!r}; choose one of {', '.join(allowed)}.")
    return value


def _range_text(minimum: int | None, maximum: int | None) -> str:
    if minimum is not None and maximum is not None:
        return f"between {minimum} and {maximum}"
    return f">= {minimum}" if minimum is not None else f"<= {maximum}"
