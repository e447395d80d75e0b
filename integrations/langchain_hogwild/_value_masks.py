"""Type masks for guided JSON values: while a worker writes an integer, number or boolean value, only
tokens that keep the text a valid beginning of such a value (or end it) may be sampled.

The candidates per kind are found once per engine (tokens that look like part of a number or a
literal, and pure closers such as "," or "}"); each step checks only those against the text so far.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from weakref import WeakKeyDictionary

import torch

from hogwild_agents.engine import HogwildEngine

KINDS = ("integer", "number", "boolean")
_CLOSERS = set(",}] \n\t")
_INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")
_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_INTEGER_PREFIX = re.compile(r"-?(0|[1-9][0-9]*)?")
_NUMBER_PREFIX = re.compile(r"-?((0|[1-9][0-9]*)(\.([0-9]+([eE]([+-]?[0-9]*)?)?)?|[eE][+-]?[0-9]*)?)?")
_LITERALS = ("true", "false")


def is_valid_value_text(kind: str, text: str, end: str = "") -> bool:
    """True when `text` (leading whitespace allowed) is the beginning of a JSON value of `kind`, or a
    complete one followed by whitespace and at most the skeleton's next character `end` ("," or "}"),
    so that the JSON around it stays valid."""
    if not text.strip():
        return True
    value, rest = _split_value(text)
    if kind == "boolean":
        if rest:
            return value in _LITERALS and rest.strip() in ("", end)
        return any(lit.startswith(value) for lit in _LITERALS)
    complete, prefix = (_INTEGER, _INTEGER_PREFIX) if kind == "integer" else (_NUMBER, _NUMBER_PREFIX)
    if rest:
        return complete.fullmatch(value) is not None and rest.strip() in ("", end)
    return prefix.fullmatch(value) is not None


def _split_value(text: str) -> tuple[str, str]:
    """(the value part, the rest from its first closer on) of `text` without its leading whitespace."""
    body = text.lstrip()
    cut = next((i for i, ch in enumerate(body) if ch in _CLOSERS), len(body))
    return body[:cut], body[cut:]


_NUMBER_CHARS = set("-0123456789.eE+")
_TEXTS: WeakKeyDictionary[HogwildEngine, list[str]] = WeakKeyDictionary()
_CACHE: WeakKeyDictionary[HogwildEngine, dict[str, tuple[list[int], list[str]]]] = WeakKeyDictionary()


def candidates(engine: HogwildEngine, kind: str) -> tuple[list[int], list[str]]:
    """Token ids (and texts) that could extend or close a value of `kind`; found once per engine."""
    per_kind = _CACHE.setdefault(engine, {})
    if kind not in per_kind:
        texts = _TEXTS.get(engine)
        if texts is None:  # every token decoded once per engine, for all kinds
            texts = _TEXTS[engine] = [engine.tokenizer.decode([i]) for i in range(len(engine.tokenizer))]
        chosen = [(i, text) for i, text in enumerate(texts) if text and _may_take_part(kind, text)]
        per_kind[kind] = ([i for i, _ in chosen], [t for _, t in chosen])
    return per_kind[kind]


def _may_take_part(kind: str, text: str) -> bool:
    """The token's text up to its first closer could sit inside a value of `kind` (or it has none)."""
    part, _ = _split_value(text)
    if kind == "boolean":
        return any(part in literal for literal in _LITERALS)
    return all(ch in _NUMBER_CHARS for ch in part)


class TypedValueProcessor:
    """A logits processor (transformers' convention) that allows only tokens continuing a JSON value of
    `kind` after the text `written()` returns, or ending it with whitespace and at most `end`. When no
    candidate fits, the scores pass unchanged."""

    def __init__(self, engine: HogwildEngine, kind: str, written: Callable[[], str], end: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.kind, self.written, self.end = kind, written, end
        self.ids, self.texts = candidates(engine, kind)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        so_far = self.written()
        # refuse blank tokens while the value has not started: blank after blank could go on forever
        blank_so_far = not so_far.strip()
        allowed = [
            token_id
            for token_id, text in zip(self.ids, self.texts, strict=True)
            if token_id < scores.shape[-1]
            and not (blank_so_far and not text.strip())
            and is_valid_value_text(self.kind, so_far + text, self.end)
        ]
        if not allowed:
            return scores
        masked = torch.full_like(scores, float("-inf"))
        index = torch.tensor(allowed, dtype=torch.long)
        masked[:, index] = scores[:, index]
        return masked
