"""Grammar engines for constrained JSON: xgrammar vs llguidance, on the embedded model's tokenizer.

    python -m benchmarks.grammar_engines                 # SmolLM2 tokenizer (49,152 tokens), 20 repeats
    python -m benchmarks.grammar_engines --repeat 3 --json out/grammar.json

Measures, per engine:
1. tokenizer preparation (once per tokenizer) and the compile time of a mid-size schema (`ORDER`) and of
   every coverage schema (cold: a new compiler or matcher, nothing cached);
2. the token-mask time of each step while the mid-size schema's instance is written token by token
   (the instance's own BPE tokens; each step computes the mask, then accepts the token), and of the
   first mask after compiling;
3. JSON-schema coverage: for each feature, a schema with instances that must be accepted and instances
   that must be rejected (written as compact JSON). "ok" means every verdict is right; "loose" means an
   invalid instance was accepted (the keyword is ignored); "strict" means a valid one was refused;
   "error" means the schema did not compile.
Both engines run without free whitespace (compact JSON, separators "," and ":").
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ORDER: dict[str, Any] = {
    "type": "object",
    "$defs": {
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "minLength": 1},
                "city": {"type": "string"},
                "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
                "country": {"enum": ["FR", "DE", "IT", "ES"]},
            },
            "required": ["street", "city", "postcode", "country"],
            "additionalProperties": False,
        }
    },
    "properties": {
        "order_id": {"type": "integer", "minimum": 1},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email"],
        },
        "shipping": {"$ref": "#/$defs/address"},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number", "exclusiveMinimum": 0},
                },
                "required": ["sku", "quantity", "price"],
            },
        },
        "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "status": {"const": "new"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["order_id", "customer", "shipping", "items", "status"],
    "additionalProperties": False,
}

ORDER_INSTANCE: dict[str, Any] = {
    "order_id": 1042,
    "customer": {"name": "Ada Lovelace", "email": "ada@example.org", "vip": True},
    "shipping": {"street": "12 rue de la Paix", "city": "Paris", "postcode": "75002", "country": "FR"},
    "items": [
        {"sku": "TEA-EARL-GREY", "quantity": 2, "price": 4.5},
        {"sku": "MUG-BLUE", "quantity": 1, "price": 12.0},
    ],
    "notes": "Leave the parcel with the neighbour if nobody answers.",
    "status": "new",
    "tags": ["gift", "express"],
}


@dataclass(frozen=True)
class Case:
    feature: str
    schema: dict[str, Any]
    valid: tuple[Any, ...]
    invalid: tuple[Any, ...]


def _obj(properties: dict[str, Any], required: Sequence[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties if required is None else required),
        **extra,
    }


CASES: tuple[Case, ...] = (
    Case("string", _obj({"s": {"type": "string"}}), ({"s": "hi"}, {"s": 'a "q"\n'}), ({"s": 1},)),
    Case(
        "string minLength/maxLength",
        _obj({"s": {"type": "string", "minLength": 2, "maxLength": 4}}),
        ({"s": "ab"}, {"s": "abcd"}),
        ({"s": "a"}, {"s": "abcde"}),
    ),
    Case(
        "string pattern",
        _obj({"s": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
        ({"s": "ABC-12"},),
        ({"s": "abc-12"}, {"s": "ABC-123"}),
    ),
    Case(
        "string format date",
        _obj({"s": {"type": "string", "format": "date"}}),
        ({"s": "2025-06-01"},),
        ({"s": "June 1st"},),
    ),
    Case(
        "array of strings",
        _obj({"a": {"type": "array", "items": {"type": "string"}}}),
        ({"a": []}, {"a": ["x", "y"]}),
        ({"a": [1, 2]},),
    ),
    Case(
        "array minItems/maxItems",
        _obj({"a": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}}),
        ({"a": [1]}, {"a": [1, 2]}),
        ({"a": []}, {"a": [1, 2, 3]}),
    ),
    Case(
        "array of objects",
        _obj({"a": {"type": "array", "items": _obj({"k": {"type": "integer"}})}}),
        ({"a": [{"k": 1}, {"k": 2}]},),
        ({"a": [{"k": "1"}]}, {"a": [{}]}),
    ),
    Case(
        "enum",
        _obj({"e": {"enum": ["red", "green", 3]}}),
        ({"e": "red"}, {"e": 3}),
        ({"e": "blue"}, {"e": "re"}),
    ),
    Case("const", _obj({"c": {"const": "fixed"}}), ({"c": "fixed"},), ({"c": "other"},)),
    Case(
        "nested objects",
        _obj({"o": _obj({"p": _obj({"q": {"type": "boolean"}})})}),
        ({"o": {"p": {"q": True}}},),
        ({"o": {"p": {}}}, {"o": {"p": {"q": "true"}}}),
    ),
    Case(
        "optional fields",
        _obj({"a": {"type": "integer"}, "b": {"type": "string"}}, required=["a"]),
        ({"a": 1}, {"a": 1, "b": "x"}),
        ({"b": "x"},),
    ),
    Case(
        "anyOf",
        _obj({"v": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 2}]}}),
        ({"v": 5}, {"v": "ab"}),
        ({"v": "abc"}, {"v": True}),
    ),
    Case(
        "oneOf",
        _obj({"v": {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}}),
        ({"v": 5}, {"v": False}),
        ({"v": "x"},),
    ),
    Case(
        "allOf",
        _obj({"v": {"allOf": [{"type": "integer"}, {"minimum": 3}]}}),
        ({"v": 3},),
        ({"v": 2}, {"v": "x"}),
    ),
    Case(
        "nullable (type list)",
        _obj({"v": {"type": ["string", "null"]}}),
        ({"v": None}, {"v": "x"}),
        ({"v": 1},),
    ),
    Case(
        "$ref/$defs",
        {"$defs": {"point": _obj({"x": {"type": "integer"}})}, **_obj({"p": {"$ref": "#/$defs/point"}})},
        ({"p": {"x": 1}},),
        ({"p": {"x": "1"}},),
    ),
    Case(
        "recursive $ref",
        {
            "$defs": {
                "node": _obj({"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#"}}})
            },
            "$ref": "#/$defs/node",
        },
        ({"v": 1, "kids": [{"v": 2, "kids": []}]},),
        ({"v": 1, "kids": [{"v": "2", "kids": []}]},),
    ),
    Case(
        "integer minimum/maximum",
        _obj({"n": {"type": "integer", "minimum": -5, "maximum": 120}}),
        ({"n": -5}, {"n": 0}, {"n": 120}),
        ({"n": -6}, {"n": 121}, {"n": 1.5}),
    ),
    Case(
        "number bounds (exclusive)",
        _obj({"x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}),
        ({"x": 0.5}, {"x": 1}),
        ({"x": 0}, {"x": 1.5}, {"x": -0.1}),
    ),
    Case(
        "multipleOf",
        _obj({"n": {"type": "integer", "multipleOf": 5}}),
        ({"n": 15},),
        ({"n": 7},),
    ),
    Case(
        "additionalProperties false",
        _obj({"a": {"type": "integer"}}, additionalProperties=False),
        ({"a": 1},),
        ({"a": 1, "b": 2},),
    ),
    Case(
        "additionalProperties schema",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        ({}, {"x": 1, "y": 2}),
        ({"x": "1"},),
    ),
    Case(
        "patternProperties",
        {"type": "object", "patternProperties": {"^n_": {"type": "integer"}}, "additionalProperties": False},
        ({"n_a": 1},),
        ({"n_a": "x"}, {"m": 1}),
    ),
    Case(
        "minProperties/maxProperties",
        {
            "type": "object",
            "additionalProperties": {"type": "integer"},
            "minProperties": 1,
            "maxProperties": 2,
        },
        ({"a": 1},),
        ({}, {"a": 1, "b": 2, "c": 3, "d": 4}),
    ),
    Case(
        "prefixItems (tuple)",
        _obj(
            {"t": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False}}
        ),
        ({"t": ["a", 1]},),
        ({"t": [1, "a"]}, {"t": ["a", 1, 2]}),
    ),
    Case(
        "uniqueItems",
        _obj({"a": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}),
        ({"a": [1, 2]},),
        ({"a": [1, 1]},),
    ),
    Case("any JSON object", {"type": "object"}, ({}, {"a": [1, {"b": None}]}), ([1], "x")),
)


class Engine:
    """A grammar engine behind one small interface (compile a schema, compute masks, accept tokens)."""

    name = ""

    def prepare(self, tokenizer: Any, vocab_size: int) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill_mask(self, matcher: Any, bitmask: torch.Tensor) -> None:
        raise NotImplementedError

    def accept(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        raise NotImplementedError


class XGrammar(Engine):
    name = "xgrammar"

    def prepare(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)  # cold: nothing cached
        # strict_mode=False: JSON Schema's own defaults (extra properties allowed unless refused)
        return compiler.compile_json_schema(
            schema, any_whitespace=False, separators=(",", ":"), strict_mode=False
        )

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill_mask(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_completed()


class LLGuidance(Engine):
    name = "llguidance"

    def prepare(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self.llg, self.fill = llguidance, llguidance.torch.fill_next_token_bitmask
        self.info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        matcher = self.llg.LLMatcher(self.info, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def matcher(self, compiled: Any) -> Any:
        return self.llg.LLMatcher(self.info, compiled, log_level=0)

    def fill_mask(self, matcher: Any, bitmask: torch.Tensor) -> None:
        self.fill(matcher, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def accepting(self, matcher: Any) -> bool:
        return matcher.is_accepting()


ENGINES: dict[str, Callable[[], Engine]] = {"xgrammar": XGrammar, "llguidance": LLGuidance}


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def accepts(engine: Engine, compiled: Any, token_ids: Sequence[int]) -> bool:
    matcher = engine.matcher(compiled)
    return all(engine.accept(matcher, t) for t in token_ids) and engine.accepting(matcher)


def coverage(engine: Engine, encode: Callable[[str], list[int]]) -> list[dict[str, Any]]:
    """One row per feature: verdict ("ok", "loose", "strict", "error") and compile time (ms)."""
    rows = []
    for case in CASES:
        started = time.perf_counter()
        try:
            compiled = engine.compile(case.schema)
        except Exception as error:  # an engine's refusal is a result here, not a failure
            rows.append({"feature": case.feature, "verdict": "error", "detail": str(error)[:120]})
            continue
        compile_ms = (time.perf_counter() - started) * 1e3
        refused = [v for v in case.valid if not accepts(engine, compiled, encode(compact(v)))]
        accepted = [v for v in case.invalid if accepts(engine, compiled, encode(compact(v)))]
        verdict = "strict" if refused else "loose" if accepted else "ok"
        detail = (
            f"refused {compact(refused)}" if refused else f"accepted {compact(accepted)}" if accepted else ""
        )
        rows.append({"feature": case.feature, "verdict": verdict, "detail": detail, "compile_ms": compile_ms})
    return rows


def mask_times(engine: Engine, compiled: Any, token_ids: Sequence[int], vocab_size: int) -> list[float]:
    """Seconds per step to compute the mask, writing `token_ids` (the first mask included)."""
    bitmask = torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)[None]
    matcher = engine.matcher(compiled)
    times = []
    for token in token_ids:
        started = time.perf_counter()
        engine.fill_mask(matcher, bitmask)
        times.append(time.perf_counter() - started)
        allowed = bool((bitmask[0, token // 32] >> (token % 32)) & 1)
        if not allowed or not engine.accept(matcher, token):
            raise AssertionError(f"{engine.name} refused token {token} of the ORDER instance")
    return times


def measure(engine: Engine, tokenizer: Any, vocab_size: int, repeat: int) -> dict[str, Any]:
    started = time.perf_counter()
    engine.prepare(tokenizer, vocab_size)
    prepare_s = time.perf_counter() - started
    compile_ms, first_ms, steps = [], [], []
    token_ids = tokenizer.encode(compact(ORDER_INSTANCE), add_special_tokens=False)
    for _ in range(repeat):
        started = time.perf_counter()
        compiled = engine.compile(ORDER)
        compile_ms.append((time.perf_counter() - started) * 1e3)
        times = mask_times(engine, compiled, token_ids, vocab_size)
        first_ms.append(times[0] * 1e3)
        steps.extend(t * 1e6 for t in times[1:])
    steps.sort()
    rows = coverage(engine, lambda text: tokenizer.encode(text, add_special_tokens=False))
    return {
        "engine": engine.name,
        "prepare_tokenizer_s": prepare_s,
        "order_compile_ms": statistics.median(compile_ms),
        "order_first_mask_ms": statistics.median(first_ms),
        "order_tokens": len(token_ids),
        "mask_us": {
            "median": statistics.median(steps),
            "mean": statistics.fmean(steps),
            "p95": steps[int(0.95 * (len(steps) - 1))],
            "max": steps[-1],
        },
        "coverage_ok": sum(r["verdict"] == "ok" for r in rows),
        "coverage": rows,
    }


def load_tokenizer(path: str | None) -> Any:
    from transformers import AutoTokenizer

    from hogwild_agents.loading import default_model_dir

    return AutoTokenizer.from_pretrained(path or default_model_dir(progress=True))


def print_report(results: list[dict[str, Any]]) -> None:
    names = [r["engine"] for r in results]
    print(f"{'':34}" + "".join(f"{n:>14}" for n in names))
    for label, get in (
        ("tokenizer preparation (s)", lambda r: f"{r['prepare_tokenizer_s']:.3f}"),
        ("ORDER schema compile (ms)", lambda r: f"{r['order_compile_ms']:.2f}"),
        ("first mask after compile (ms)", lambda r: f"{r['order_first_mask_ms']:.2f}"),
        ("mask per step, median (us)", lambda r: f"{r['mask_us']['median']:.1f}"),
        ("mask per step, mean (us)", lambda r: f"{r['mask_us']['mean']:.1f}"),
        ("mask per step, p95 (us)", lambda r: f"{r['mask_us']['p95']:.1f}"),
        ("mask per step, max (us)", lambda r: f"{r['mask_us']['max']:.1f}"),
        (f"coverage ok (of {len(CASES)})", lambda r: str(r["coverage_ok"])),
    ):
        print(f"{label:34}" + "".join(f"{get(r):>14}" for r in results))
    print()
    print(f"{'feature':34}" + "".join(f"{n:>14}" for n in names))
    for i, case in enumerate(CASES):
        print(f"{case.feature:34}" + "".join(f"{r['coverage'][i]['verdict']:>14}" for r in results))
    for r in results:
        for row in r["coverage"]:
            if row["verdict"] != "ok":
                print(f"  {r['engine']}: {row['feature']}: {row['verdict']} {row.get('detail', '')}")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: the embedded SmolLM2's)")
    parser.add_argument("--engines", default="xgrammar,llguidance")
    parser.add_argument("--repeat", type=int, default=20, help="times the ORDER instance is written")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.tokenizer)
    vocab_size = len(tokenizer)
    results = [
        measure(ENGINES[name](), tokenizer, vocab_size, args.repeat) for name in args.engines.split(",")
    ]
    print(
        f"{platform.processor() or platform.machine()}, python {sys.version.split()[0]}, vocab {vocab_size}"
    )
    print_report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
