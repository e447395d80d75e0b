"""The Jinja sandbox that protocol templates render in, with bounded time and size.

Jinja's `SandboxedEnvironment` stops attribute escapes but not resource use: nested loops, `10 ** 10 ** 10`,
`"x" * 10**10` or a string doubled in a loop hang the process or take gigabytes. `BoundedSandbox` adds:

- a deadline per render (`timeout_s`), checked on every line the template's compiled code runs (a trace
  function scoped to template frames), on every call, operator and filter, and between output chunks;
- a size limit (`max_chars`): operators, filters, method calls and output are checked BEFORE they
  build a value larger than about `max_chars` characters, and a render's whole output is capped too.

A limit that is hit raises `RenderLimitError` (the protocol layer names the template and block).
"""

from __future__ import annotations

import functools
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

DEFAULT_TIMEOUT_S = 2.0
DEFAULT_MAX_CHARS = 1_000_000
MAX_INT_BITS = 16_384  # about 4900 decimal digits: far more than any template needs
_GROWING_METHODS = {"append", "extend", "insert", "update", "add", "setdefault"}
_WIDTH = re.compile(r"\d+")


class RenderLimitError(Exception):
    """A template went past its rendering time or size limit."""


def text_weight(value: Any, limit: int) -> int:
    """About how many characters `value` takes as text, counted up to just past `limit` (so the count
    stays cheap for huge or self-referencing containers)."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item) + 1
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, Mapping):
            total += 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2
            stack.extend(item)
        else:
            total += 8
    return total


class _CodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join (Jinja compiles it to a plain str join)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(SandboxedEnvironment):
    """A SandboxedEnvironment whose renders are bounded in time and size (see the module docstring).
    Render through `render_blocks` (or inside `limits()`) for the time limit to apply."""

    intercepted_binops = frozenset({"+", "*", "**", "%", "//", "/", "-"})
    code_generator_class = _CodeGenerator

    def __init__(
        self,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_chars: int = DEFAULT_MAX_CHARS,
        filters: Mapping[str, Callable[..., Any]] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(finalize=self._checked_output, **options)
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs
        self.filters.update(filters or {})
        self.filters = {name: self._guard_filter(name, f) for name, f in self.filters.items()}
        self._local = threading.local()

    # ---- time ----------------------------------------------------------------------------------
    @contextmanager
    def limits(self) -> Iterator[None]:
        """Apply the time limit to what runs inside (in this thread)."""
        if getattr(self._local, "deadline", None) is not None:  # a render inside a render
            yield
            return
        self._local.deadline = time.monotonic() + self.timeout_s
        previous = sys.gettrace()

        def on_line(frame: Any, event: str, arg: Any) -> Any:
            self.check_time()
            return on_line

        def on_call(frame: Any, event: str, arg: Any) -> Any:
            if "__jinja_template__" in frame.f_globals or frame.f_code.co_filename == "<template>":
                self.check_time()
                return on_line
            return previous(frame, event, arg) if previous is not None else None

        sys.settrace(on_call)
        try:
            yield
        finally:
            sys.settrace(previous)
            self._local.deadline = None

    def check_time(self) -> None:
        deadline = getattr(self._local, "deadline", None)
        if deadline is not None and time.monotonic() > deadline:
            raise RenderLimitError(
                f"rendering took longer than {self.timeout_s:g} s (the protocol's render_timeout_s); "
                "simplify the template's loops"
            )

    def render_blocks(self, chunks: Iterable[str]) -> str:
        """Join a block's output chunks under both limits."""
        with self.limits():
            out, size = [], 0
            for chunk in chunks:
                size += len(chunk)
                if size > self.max_chars:
                    raise self._too_big("the output", size)
                out.append(chunk)
                self.check_time()
            return "".join(out)

    # ---- size ----------------------------------------------------------------------------------
    def _too_big(self, what: str, size: int) -> RenderLimitError:
        return RenderLimitError(
            f"{what} would be over {self.max_chars} characters (about {size}; the protocol's "
            "max_render_chars)"
        )

    def check_size(self, value: Any, what: str) -> None:
        size = text_weight(value, self.max_chars)
        if size > self.max_chars:
            raise self._too_big(what, size)

    def check_length(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise self._too_big(what, size)

    def _checked_output(self, value: Any) -> Any:
        if not isinstance(value, str):  # a string's length is checked as output
            self.check_size(value, "a value written by the template")
        return value

    def bounded_concat(self, values: tuple[Any, ...]) -> str:
        self.check_time()
        self.check_size(list(values), "a `~` concatenation")
        return "".join(map(str, values))

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        self.check_time()
        self._check_binop(operator, left, right)
        result = super().call_binop(context, operator, left, right)
        if isinstance(result, int) and not isinstance(result, bool) and result.bit_length() > MAX_INT_BITS:
            raise RenderLimitError(f"an integer over {MAX_INT_BITS} bits from `{operator}`")
        return result

    def _check_binop(self, operator: str, left: Any, right: Any) -> None:
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            if right * left.bit_length() > MAX_INT_BITS:
                raise RenderLimitError(f"`{left} ** {right}` is over {MAX_INT_BITS} bits")
        elif operator == "*" and ints:
            if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise RenderLimitError(f"a product over {MAX_INT_BITS} bits")
        elif operator == "*":
            count, sequence = (left, right) if isinstance(left, int) else (right, left)
            if isinstance(count, int) and count > 0 and isinstance(sequence, Sized):
                budget = self.max_chars // count + 1
                self.check_length(text_weight(sequence, budget) * count, "a `*` repetition")
        elif operator == "+" and not ints:
            self.check_size([left, right], "a `+` concatenation")
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, right, "a `%` format")

    def _check_format(self, template: str, values: Any, what: str) -> None:
        widths = sum(int(w) for w in _WIDTH.findall(template) if len(w) < 12) + len(template)
        self.check_length(widths, what)
        self.check_size(values, what)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        template = value.__self__

        def checked(*args: Any, **kwargs: Any) -> str:
            self._check_format(template, [args, kwargs], "a str.format call")
            return wrapper(*args, **kwargs)

        return functools.update_wrapper(checked, value)

    def call(self, context: Any, func: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.check_time()
        self._check_call(func, args, kwargs)
        result = super().call(context, func, *args, **kwargs)
        if isinstance(result, str | list | tuple | dict | set):
            self.check_size(result, f"the result of {getattr(func, '__name__', 'a call')}()")
        return result

    def _check_call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Refuse calls that would build a huge value from small arguments."""
        values = [*args, *kwargs.values()]
        self.check_size(values, "the arguments of a call")
        owner, name = getattr(func, "__self__", None), getattr(func, "__name__", "")
        if isinstance(owner, str):  # widths and counts of str methods (center, ljust, zfill, ...)
            self._check_counts(values, f"str.{name}()")
            self._check_str_method(owner, name, args, kwargs)
        elif isinstance(owner, list | dict | set) and name in _GROWING_METHODS:
            added = sum(len(v) if isinstance(v, Sized) else 1 for v in values)
            self.check_length(len(owner) + added, f"a container grown by .{name}()")

    def _check_counts(self, values: Iterable[Any], what: str) -> None:
        for value in values:
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_chars:
                raise self._too_big(f"an argument of {what}", value)

    def _check_str_method(self, text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
            self.check_length(_replaced_length(text, args[0], args[1]), "str.replace")
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            self.check_length(len(text) + text.count("\t") * max(size, 0), "str.expandtabs")
        elif name == "join" and args:
            items = args[0]
            count = len(items) if isinstance(items, Sized) else 0
            self.check_length(text_weight(items, self.max_chars) + len(text) * count, "str.join")
        elif name == "translate" and args and isinstance(args[0], Mapping):
            longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
            self.check_length(len(text) * longest, "str.translate")

    # ---- filters -------------------------------------------------------------------------------
    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        check = _FILTER_CHECKS.get(name)

        @functools.wraps(func)  # keeps Jinja's pass_context / pass_environment marks
        def guarded(*args: Any, **kwargs: Any) -> Any:
            self.check_time()
            values = [v for v in (*args, *kwargs.values()) if not _is_jinja_state(v)]
            self._check_counts(values[1:], f"the filter {name!r}")  # widths, counts (not the input)
            if name in _CONSUMING and values and not isinstance(values[0], Sized):
                args = _listed_first(args)  # a generator: list it once, to measure and to use it
                values = [v for v in (*args, *kwargs.values()) if not _is_jinja_state(v)]
            self.check_size(values, f"the input of the filter {name!r}")
            if check is not None:
                self.check_length(check(values, kwargs), f"the output of the filter {name!r}")
            result = func(*args, **kwargs)
            if isinstance(result, str | list | tuple | dict | set):
                self.check_size(result, f"the output of the filter {name!r}")
            return result

        return guarded


def _is_jinja_state(value: Any) -> bool:
    return isinstance(value, Context | EvalContext | SandboxedEnvironment)


def _listed_first(args: tuple[Any, ...]) -> tuple[Any, ...]:
    for i, value in enumerate(args):
        if not _is_jinja_state(value):
            return (*args[:i], list(value), *args[i + 1 :])
    return args


def _replaced_length(text: str, old: str, new: str) -> int:
    count = len(text) + 1 if not old else text.count(old)
    return len(text) + count * max(len(new) - len(old), 0)


def _indent_length(values: list[Any], kwargs: dict[str, Any]) -> int:
    text = str(values[0]) if values else ""
    width = values[1] if len(values) > 1 else kwargs.get("width", 4)
    per_line = len(width) if isinstance(width, str) else max(int(width), 0)
    return len(text) + (text.count("\n") + 1) * per_line


def _replace_length(values: list[Any], kwargs: dict[str, Any]) -> int:
    if len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
        return _replaced_length(*values[:3])
    return 0


def _format_length(values: list[Any], kwargs: dict[str, Any]) -> int:
    template = str(values[0]) if values else ""
    return sum(int(w) for w in _WIDTH.findall(template) if len(w) < 12) + len(template)


def _join_length(values: list[Any], kwargs: dict[str, Any]) -> int:
    items = values[0] if values else ()
    separator = values[1] if len(values) > 1 else kwargs.get("d", "")
    count = len(items) if isinstance(items, Sized) else 0
    return len(str(separator)) * count


def _wordwrap_length(values: list[Any], kwargs: dict[str, Any]) -> int:
    text = str(values[0]) if values else ""
    width = values[1] if len(values) > 1 else kwargs.get("width", 79)
    wrap = values[3] if len(values) > 3 else kwargs.get("wrapstring") or "\n"
    return len(text) + (len(text) // max(int(width), 1) + 1) * len(str(wrap))


_FILTER_CHECKS: dict[str, Callable[[list[Any], dict[str, Any]], int]] = {
    "indent": _indent_length,
    "replace": _replace_length,
    "format": _format_length,
    "join": _join_length,
    "wordwrap": _wordwrap_length,
}
_CONSUMING = {"join", "list", "sum", "unique", "sort", "batch", "slice"}
