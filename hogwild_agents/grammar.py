"""Grammar-constrained writing: a worker's next tokens are limited to those that keep its text inside a
grammar (a JSON schema, any JSON object, or a tool call), by llguidance's token masks.

    grammar = json_schema_grammar({"type": "object", "properties": {"city": {"type": "string"}}})
    constraint = Constraint(engine, grammar, budget=64)
    run = engine.start(prompt, max_new_tokens=64, logits_processors={0: [constraint]})  # worker 0: JSON
    while not run.done and not constraint.stopped:
        run.step()
    constraint.sync(run.prompt_ids + run.workers[0].stream)
    constraint.value()                                                  # the parsed object

A `Constraint` is a logits processor (transformers' convention, `processor(input_ids, scores)`): on each
call it feeds its matcher the worker's tokens written since it was installed, then masks every token the
grammar does not allow. Tokens the grammar refuses (a step header or an interjection the run put into
the stream) are skipped, so the constrained text is only what the worker wrote under the grammar.
`forced_tokens()` gives the text the grammar leaves no choice about (a key, a tool's name), for the
caller to force into the stream (`run.force`): it then costs no sampling step and no budget.

Output is compact JSON: no free whitespace, so no paragraph break can end a step inside it. Objects
that list `properties` take no other keys unless the schema allows them (`additionalProperties`), as in
strict structured-output modes. When the grammar is complete only end-of-sequence may follow (`stopped`).
With a `budget` (tokens the worker may still sample), the last tokens steer toward the shortest way to
close the value, so the text is complete when the budget ends; a worker stopped early by anything else
(a timeout, a stop string, another worker's answer) is completed by `finish()` in the same way.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from hogwild_agents.errors import GrammarError
from hogwild_agents.tool_calls import CLOSE, OPEN, parse_tool_calls

if TYPE_CHECKING:
    from hogwild_agents.engine import HogwildEngine

SEPARATORS = (",", ":")  # compact JSON between items and after keys
JSON_OPTIONS = {
    "whitespace_flexible": False,  # no free whitespace: no paragraph break can end a step inside a value
    "item_separator": SEPARATORS[0],
    "key_separator": SEPARATORS[1],
    "lenient": True,  # keywords llguidance does not implement (e.g. uniqueItems) are ignored, not refused
}
CLOSING_WINDOW = 64  # with a budget: tokens before its end from which the shortest completion is tracked
CLOSING_MARGIN = 2  # steer to the completion once it needs this many tokens fewer than are left, or more
MAX_COMPLETION = 1024  # tokens `finish()` may add to close a value


@dataclass(frozen=True)
class Grammar:
    """A grammar ready for llguidance. `kind`: "json" (the text is one JSON value), "tool_call" (one
    `<tool_call>...</tool_call>`; with `opened`, the worker wrote the opening tag before the grammar
    began) or "tool_call_or_json" (either of the two)."""

    source: str  # llguidance's grammar definition
    kind: str
    opened: bool = False


# ---- grammars -----------------------------------------------------------------------------------
def json_schema_grammar(schema: Mapping[str, Any]) -> Grammar:
    """One JSON value that validates against `schema` (a JSON Schema dict)."""
    return _grammar(["start: answer", _json_rule("answer", schema)], "json", what="The JSON schema")


def json_object_grammar() -> Grammar:
    """Any JSON object (JSON mode)."""
    return json_schema_grammar({"type": "object"})


def tool_call_grammar(
    tools: Sequence[Mapping[str, Any]],
    name: str | None = None,
    *,
    opened: bool = False,
    or_json: Mapping[str, Any] | None = None,
) -> Grammar:
    """One `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (the format of
    `hogwild_agents.tool_calls`) whose arguments validate against the named tool's parameters.

    `tools`: OpenAI-format tool schemas (`{"type": "function", "function": {"name", "parameters"}}`);
    `name`: the tool that must be called (None: any of them); `opened`: the worker has already written
    `<tool_call>` and the grammar starts after it; `or_json`: a JSON schema the text may match instead
    of a call (an answer in a response format, when calling a tool is optional). A newline may follow
    the opening tag and precede the closing one (the layout of Qwen/Hermes chat templates)."""
    parameters = {}
    for tool in tools:
        function = tool.get("function", tool)
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise GrammarError(f"A tool schema needs a function name, got {tool!r}.")
        parameters[function["name"]] = function.get("parameters") or {"type": "object", "properties": {}}
    if name is not None and name not in parameters:
        raise GrammarError(f"No tool is named {name!r}; the tools are {sorted(parameters)}.")
    names = [name] if name is not None else list(parameters)
    if not names:
        raise GrammarError("A tool-call grammar needs at least one tool.")
    opening = "" if opened else f"{_lark_string(OPEN)} "
    lines = [
        f'tool_call: {opening}"\\n"? call "\\n"? {_lark_string(CLOSE)}',
        "call: " + " | ".join(f"call_{i}" for i in range(len(names))),
    ]
    for i, tool_name in enumerate(names):
        head = json.dumps({"name": tool_name, "arguments": 0}, ensure_ascii=False, separators=SEPARATORS)
        lines.append(f'call_{i}: {_lark_string(head[: -len("0}")])} args_{i} "}}"')
        lines.append(_json_rule(f"args_{i}", parameters[tool_name]))
    kind = "tool_call"
    if or_json is not None:
        lines += ["start: tool_call | answer", _json_rule("answer", or_json)]
        kind = "tool_call_or_json"
    else:
        lines.insert(0, "start: tool_call")
    return _grammar(lines, kind, opened=opened, what="The tools' parameter schemas")


def _json_rule(name: str, schema: Mapping[str, Any]) -> str:
    """A Lark rule matching compact JSON that validates against `schema`."""
    if not isinstance(schema, Mapping):
        raise GrammarError(f"A JSON schema must be a dict, got {type(schema).__name__}.")
    body = {**closed_objects(dict(schema)), "x-guidance": JSON_OPTIONS}
    return f"{name}: %json {json.dumps(body, ensure_ascii=False)}"


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _grammar(lines: list[str], kind: str, *, opened: bool = False, what: str) -> Grammar:
    source = llguidance.LLMatcher.grammar_from_lark("\n".join(lines))
    error = llguidance.LLMatcher.validate_grammar(source)
    if error:
        reason = re.sub(r"^at \d+\(\d+\): ", "", error.splitlines()[0])  # the position in our Lark text
        raise GrammarError(f"{what} cannot be used to constrain output: {reason}. Fix the schema.")
    return Grammar(source, kind, opened)


_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_KEYWORDS = (
    "items",
    "additionalProperties",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedProperties",
)


def closed_objects(schema: Any) -> Any:
    """A copy of `schema` where every object schema that lists `properties` and says nothing about
    other keys (`additionalProperties`, `patternProperties`, `unevaluatedProperties`) allows no others."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _MAP_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _LIST_KEYWORDS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    for key in _SCHEMA_KEYWORDS:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
        elif key == "items" and isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if "properties" in out and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


# ---- per-engine tokenizer data --------------------------------------------------------------------
class GrammarTokenizer:
    """llguidance's view of an engine's tokenizer (built once per engine: about a second), the
    engine's end-of-sequence ids, and a token order for closing values (built on first use)."""

    def __init__(self, engine: HogwildEngine) -> None:
        tokenizer = engine.tokenizer
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise GrammarError(
                f"Constrained output needs a fast (Rust) Hugging Face tokenizer; {type(tokenizer).__name__} "
                "is not one. Load the model with its tokenizer.json."
            )
        self.tokenizer = tokenizer
        self.vocab_size = max(len(tokenizer), int(getattr(engine.model.config, "vocab_size", 0) or 0))
        eos = sorted(engine.eos_token_ids)
        self.eos_ids = eos
        self.llg = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size, eos_token=eos or None)
        self._texts: list[str] | None = None
        self._orders: dict[bool, np.ndarray] = {}

    @property
    def texts(self) -> list[str]:
        """Each token's text on its own ("" past the tokenizer's vocabulary)."""
        if self._texts is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._texts = texts + [""] * (self.vocab_size - len(texts))
        return self._texts

    def closing_order(self, in_string: bool) -> np.ndarray:
        """Token ids, best first, for closing a JSON value fast. Inside a string: a closing quote (with
        brackets after it, longest first); outside: closing brackets, longest first. Then every other
        token, shortest first: a comma first (the grammar wants more items or keys), then digits 1-9 (they
        end a number such as "0.0" that must exceed 0)."""
        if in_string not in self._orders:
            texts = self.texts
            closers = {'"', "]", "}"} if in_string else {"]", "}"}

            def rank(i: int) -> tuple[int, int, int, int]:
                text = texts[i]
                if not text:
                    return (2, 0, 0, i)
                if set(text) <= closers and (text[0] == '"') == in_string:
                    return (0, -len(text), 0, i)
                return (1, len(text), 0 if text == "," else 1 if text[0] in "123456789" else 2, i)

            self._orders[in_string] = np.array(sorted(range(self.vocab_size), key=rank), dtype=np.int64)
        return self._orders[in_string]


def scan_json_string_state(text: str, in_string: bool = False, escaped: bool = False) -> tuple[bool, bool]:
    """(inside a JSON string, after a backslash) at the end of `text`, from the given state at its start."""
    for char in text:
        if escaped:
            escaped = False
        elif in_string and char == "\\":
            escaped = True
        elif char == '"':
            in_string = not in_string
    return in_string, escaped


_TOKENIZERS: weakref.WeakKeyDictionary[Any, GrammarTokenizer] = weakref.WeakKeyDictionary()


def grammar_tokenizer(engine: HogwildEngine) -> GrammarTokenizer:
    """The engine's GrammarTokenizer, built on first use and kept as long as the engine."""
    found = _TOKENIZERS.get(engine)
    if found is None:
        found = _TOKENIZERS[engine] = GrammarTokenizer(engine)
    return found


# ---- a constraint on one worker -------------------------------------------------------------------
class Constraint:
    """One worker's grammar constraint, used as a logits processor; see the module docstring.

    `start`: the length of `input_ids` (prompt + the worker's stream) when the constraint is installed;
    None: the length at the first call. `budget`: tokens the worker may still sample (None: unbounded;
    tokens handed out by `forced_tokens` do not count).
    The processor sees a token only at the worker's next choice: after the run (or a step), call
    `sync(prompt ids + the worker's stream)` before reading `text`, `complete` or `value()`.
    """

    def __init__(
        self, engine: HogwildEngine, grammar: Grammar, *, start: int | None = None, budget: int | None = None
    ) -> None:
        self.engine, self.grammar, self.budget = engine, grammar, budget
        self.info = grammar_tokenizer(engine)
        self.matcher = llguidance.LLMatcher(self.info.llg, grammar.source, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"The grammar cannot be used: {self.matcher.get_error()}")
        self.fed = start  # input_ids consumed so far
        self.token_ids: list[int] = []  # the tokens the grammar took: the constrained text
        self.skipped = 0  # stream tokens the grammar refused (headers, interjections)
        self.forced = 0  # tokens of the value handed out by `forced_tokens` (not sampled)
        self._handed_out: list[int] = []  # forced tokens not yet seen in the stream
        self._plan: list[int] = []  # the closing path being followed, when the budget runs short
        self._next_check = 0  # tokens written before the closing path is looked for again
        self._finished: str | None = None

    # ---- state ---------------------------------------------------------------------------------
    @property
    def stopped(self) -> bool:
        """The grammar is complete and takes no more tokens: only end-of-sequence may follow."""
        return self.matcher.is_stopped()

    @property
    def complete(self) -> bool:
        """The text so far is a complete match (more may still follow, e.g. digits of a top-level number)."""
        return self.matcher.is_accepting()

    @property
    def text(self) -> str:
        """The constrained text written so far."""
        return self.info.tokenizer.decode(self.token_ids)

    def sync(self, input_ids: Sequence[int] | torch.Tensor) -> None:
        """Feed the matcher the tokens of `input_ids` (prompt + stream) it has not seen yet."""
        if self.fed is None:
            self.fed = len(input_ids)
            return
        new = input_ids[self.fed :]
        new = new.tolist() if isinstance(new, torch.Tensor) else list(new)
        self.fed += len(new)
        for token in new:
            if self.matcher.is_stopped() or self.matcher.try_consume_tokens([token]) != 1:
                self.skipped += 1
                continue
            self.token_ids.append(token)
            if self._handed_out:
                if self._handed_out[0] == token:
                    self.forced += 1
                    self._handed_out = self._handed_out[1:]
                else:
                    self._handed_out = []
            if self._plan:
                self._plan = self._plan[1:] if self._plan[0] == token else []

    @property
    def sampled(self) -> int:
        """Tokens of the value the worker sampled (the rest were forced)."""
        return len(self.token_ids) - self.forced

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar allows no alternative to from here (a key, a tool's name, closing
        brackets), for the caller to force into the worker's stream (`HogwildRun.force`): forced
        tokens cost no sampling step and count against no budget."""
        if self.matcher.is_stopped() or self._handed_out:
            return []
        forced = self.matcher.compute_ff_tokens()
        try:  # the forced text as the tokenizer writes it (the way the model has seen such text)
            text = self.matcher.compute_ff_bytes().decode("utf-8")
        except UnicodeDecodeError:
            text = ""
        natural = self.engine.encode(text)
        if natural and self.matcher.validate_tokens(natural) == len(natural):
            forced = natural
        self._handed_out = list(forced)
        return list(forced)

    # ---- masking -------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.sync(input_ids[0])
        allowed = self.allowed(scores.shape[-1])
        return scores.masked_fill(~allowed, float("-inf"))

    def allowed(self, vocab_size: int) -> torch.Tensor:
        """A bool mask [vocab_size] of the tokens the worker may take next."""
        if self.matcher.is_error():
            raise GrammarError(f"The grammar matcher failed: {self.matcher.get_error()}")
        allowed = np.zeros(vocab_size, dtype=bool)
        eos = [i for i in self.info.eos_ids if i < vocab_size]
        plan = [] if self.matcher.is_stopped() else self._closing_plan()
        if self.matcher.is_stopped():
            allowed[eos] = True
        elif plan:
            allowed[plan[0]] = True
        else:
            bits = self._mask(self.matcher)[:vocab_size]
            allowed[: len(bits)] = bits
            if self.matcher.is_accepting():
                allowed[eos] = True
        return torch.from_numpy(allowed)

    def _mask(self, matcher: Any) -> np.ndarray:
        packed = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(packed, bitorder="little")[: self.info.vocab_size].view(bool)

    def _closing_plan(self) -> list[int]:
        """With a budget about to end: the path that closes the value, once it needs (nearly) all the
        tokens left; empty otherwise. The path is looked for when CLOSING_WINDOW tokens are left, then
        again after half the slack it leaves (a token rarely adds more than one to the path)."""
        written = self.sampled
        if self.budget is None or self._plan:
            return self._plan
        left = self.budget - written
        if left > CLOSING_WINDOW or written < self._next_check:
            return []
        path, _ = self.completion(limit=left + CLOSING_MARGIN)
        slack = left - len(path) - CLOSING_MARGIN
        if slack <= 0:
            self._plan = path
        self._next_check = written + max(1, slack // 2)
        return self._plan

    def completion(self, limit: int = MAX_COMPLETION) -> tuple[list[int], bool]:
        """A short token path from the current state to a complete match (forced tokens where the grammar
        has them, else the first allowed token in `closing_order`), at most `limit` tokens long; and
        whether it completes the match."""
        matcher = self.matcher.deep_copy()
        texts = self.info.texts
        state = scan_json_string_state(self.text)
        path: list[int] = []
        while not matcher.is_accepting() and len(path) < limit:
            chosen = matcher.compute_ff_tokens()[: limit - len(path)]
            if not chosen:
                order = self.info.closing_order(state[0])
                candidates = np.flatnonzero(self._mask(matcher)[order])
                if not len(candidates):
                    break
                chosen = [int(order[candidates[0]])]
            matcher.consume_tokens(chosen)
            path += chosen
            for token in chosen:
                state = scan_json_string_state(texts[token], *state)
        return path, matcher.is_accepting()

    # ---- the result ----------------------------------------------------------------------------
    def finish(self) -> str:
        """The constrained text, completed by the shortest path found when it is not a complete match."""
        if self._finished is None:
            if self.complete:
                self._finished = self.text
            else:
                path, done = self.completion()
                if not done:
                    raise GrammarError(
                        f"The constrained text could not be completed within {MAX_COMPLETION} tokens: "
                        f"{self.text[-200:]!r}"
                    )
                self._finished = self.info.tokenizer.decode(self.token_ids + path)
        return self._finished

    def value(self) -> Any:
        """The parsed result of `finish()`: a JSON value, or a ParsedToolCall when the text is a call."""
        text = self.finish()
        if self.grammar.opened or (self.grammar.kind != "json" and text.startswith(OPEN)):
            return parse_tool_calls((OPEN if self.grammar.opened else "") + text)[0]
        return json.loads(text)
