"""Collaboration protocols: Jinja2 templates rendered into the `RunScript` a run consumes.

A protocol is a template made of named blocks (see `templates/collaborate.jinja` for the list and the
variables). `Protocol.render` renders each block for one run: the rules become the system message, the
task goes through the model's own chat template, and the collaboration framing follows the assistant's
generation prompt. All templates render in a sandboxed environment with strict undefined variables.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import jinja2
from jinja2 import nodes

from hogwild_agents import chat as chat_template
from hogwild_agents import validation
from hogwild_agents.chat import THINK, normalize_messages
from hogwild_agents.encoding import MarkedText
from hogwild_agents.errors import HogwildError, InvalidArgumentError
from hogwild_agents.sandbox import DEFAULT_MAX_CHARS, DEFAULT_TIMEOUT_S, BoundedSandbox
from hogwild_agents.script import RunScript
from hogwild_agents.segmentation import is_step_end
from hogwild_agents.views import LAYOUTS

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

REQUIRED_BLOCKS = ("system", "opening", "step_header", "others_header", "own_header", "finisher")
OPTIONAL_BLOCKS = ("interjection", "others_separator")
WORKER_NAMES = (
    "Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi",
    "Ivan", "Judy", "Mallory", "Niaj", "Olivia", "Peggy", "Rupert", "Sybil",
)  # fmt: skip
RESERVED_VARIABLES = frozenset(
    {"workers", "n_workers", "layout", "tools", "strategies", "examples", "answer_format"}
    | {"worker", "worker_index", "step"}
)
_MAX_EXTENDS = 16


class ProtocolError(HogwildError, ValueError):
    """A protocol template is missing, malformed, unsafe or fails to render."""


# ---- where templates live ---------------------------------------------------------------------


def templates_dir() -> Traversable:
    """The shipped templates: `hogwild_agents/templates` when installed, else the checkout's `templates/`."""
    packaged = resources.files("hogwild_agents") / "templates"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "templates"


def _shipped_file(name: str) -> Traversable | None:
    stem = name.removesuffix(".jinja")
    if not stem or stem.startswith(("_", ".")) or "/" in stem or "\\" in stem:
        return None
    file = templates_dir() / f"{stem}.jinja"
    return file if file.is_file() else None


def _description(source: str) -> str:
    """The first line of the template's leading `{# ... #}` comment."""
    match = re.match(r"\s*\{#-?\s*(.*)", source)
    return match.group(1).strip() if match else ""


def shipped_protocols() -> dict[str, str]:
    """Shipped protocol names, each with its one-line description."""
    found = sorted(f.name for f in templates_dir().iterdir() if f.name.endswith(".jinja"))
    return {
        name.removesuffix(".jinja"): _description((templates_dir() / name).read_text(encoding="utf-8"))
        for name in found
        if not name.startswith("_")
    }


# ---- answers ----------------------------------------------------------------------------------

_FINAL_LINE = re.compile(r"final answer\**\s*:\**[ \t]*([^\n]*)", re.IGNORECASE)


def _boxed_at(text: str, start: int) -> str | None:
    """The content of the `\\boxed{...}` starting at `start`, or None when its braces never close."""
    open_brace = text.find("{", start)
    depth, i = 0, open_brace
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, e.g. \{ inside a set
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth == 0:
            return text[open_brace + 1 : i]
        i += 1
    return None


def _last_boxed(text: str) -> tuple[int, str] | None:
    for match in reversed(list(re.finditer(r"\\boxed\s*\{", text))):
        content = _boxed_at(text, match.start())
        if content is not None and content.strip():
            return match.start(), content.strip()
    return None


def _last_final_line(text: str) -> tuple[int, str] | None:
    for match in reversed(list(_FINAL_LINE.finditer(text))):
        answer = match.group(1).strip().strip("*").strip()
        if answer and "\\boxed" not in answer:
            return match.start(), answer
    return None


def extract_answer(text: str) -> str | None:
    """The last final answer in `text`: a `\\boxed{...}` (balanced braces) or a "Final answer: ..." line,
    whichever comes later; None when there is neither."""
    found = [hit for hit in (_last_boxed(text), _last_final_line(text)) if hit is not None]
    return max(found)[1] if found else None


# ---- tools ------------------------------------------------------------------------------------


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI-format tool schemas (or bare function schemas) as {name, description, parameters} dicts."""
    result = []
    for tool in tools or ():
        spec = tool.get("function", tool) if tool.get("type", "function") == "function" else tool
        if not spec.get("name"):
            raise ValueError(f"Tool schema without a name: {tool!r}")
        parameters = spec.get("parameters") or {"type": "object", "properties": {}}
        result.append(
            {"name": spec["name"], "description": spec.get("description", ""), "parameters": parameters}
        )
    return result


# ---- templates --------------------------------------------------------------------------------


def _join_names(names: Sequence[str]) -> str:
    """["A", "B", "C"] -> "A, B and C"."""
    names = list(names)
    if len(names) < 2:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _paragraphs(text: str) -> str:
    """`text` stripped, with runs of blank lines collapsed into one."""
    return re.sub(r"\n[ \t]*(?:\n[ \t]*)+\n", "\n\n", text.strip())


def _shipped_source(name: str) -> tuple[str, str, Callable[[], bool]] | None:
    file = _shipped_file(name)
    return None if file is None else (file.read_text(encoding="utf-8"), str(file), lambda: True)


def _environment(user_loader: jinja2.BaseLoader | None, limits: RenderLimits) -> BoundedSandbox:
    loaders = [user_loader] if user_loader else []
    return BoundedSandbox(
        timeout_s=limits.timeout_s,
        max_chars=limits.max_chars,
        filters={
            "join_names": _join_names,
            "json": lambda value: json.dumps(value, ensure_ascii=False),
            "paragraphs": _paragraphs,
        },
        loader=jinja2.ChoiceLoader([*loaders, jinja2.FunctionLoader(_shipped_source)]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        autoescape=False,
    )


@dataclass(frozen=True)
class RenderLimits:
    """Bounds of one block's render: wall-clock seconds and characters (of output, and of any value a
    template builds)."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    max_chars: int = DEFAULT_MAX_CHARS

    def __post_init__(self) -> None:
        validation.timeout(self.timeout_s, "render_timeout_s", optional=False)
        validation.positive_integer(self.max_chars, "max_render_chars")


def _template_line(error: BaseException) -> tuple[str | None, int | None]:
    """(template name, line) of the innermost template frame in the error's traceback."""
    where: tuple[str | None, int | None] = (None, None)
    tb = error.__traceback__
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if template is not None:
            where = (template.name, template.get_corresponding_lineno(tb.tb_lineno))
        tb = tb.tb_next
    return where


def _error(label: str, name: str | None, line: int | None, message: str) -> ProtocolError:
    place = f"template {label!r}"
    if name and name != label:
        place += f" (in {name!r})"
    if line:
        place += f", line {line}"
    return ProtocolError(f"{place}: {message}")


@dataclass(frozen=True)
class _Source:
    label: str  # how errors name the template: shipped name, "<text>" or a path
    entry: str  # the name the environment loads it by
    loader: jinja2.BaseLoader | None = None


def _parent_name(env: BoundedSandbox, template: jinja2.Template) -> str | None:
    """The template named by `{% extends %}`, or None."""
    source = env.loader.get_source(env, template.name)[0]  # type: ignore[union-attr]
    extends = env.parse(source, template.name, template.filename).find(nodes.Extends)
    if extends is None:
        return None
    if not isinstance(extends.template, nodes.Const):
        raise _error(template.name, None, extends.lineno, "{% extends %} must name a template literally.")
    return extends.template.value


class _Blocks:
    """A template with its `{% extends %}` chain, rendering one block at a time."""

    def __init__(self, source: _Source, limits: RenderLimits) -> None:
        self.label, self.entry = source.label, source.entry
        self.env = _environment(source.loader, limits)
        try:
            self.chain = [self.env.get_template(source.entry)]
            while (parent := _parent_name(self.env, self.chain[-1])) is not None:
                if len(self.chain) > _MAX_EXTENDS:
                    raise _error(self.label, None, None, "{% extends %} chain is too deep (a cycle?).")
                self.chain.append(self.env.get_template(parent))
        except jinja2.TemplateSyntaxError as err:
            raise self._error(err.name, err.lineno, err.message or "syntax error") from None
        except jinja2.TemplateNotFound as err:
            names = ", ".join(shipped_protocols())
            raise _error(
                self.label, None, None, f"template {err.name!r} not found (shipped: {names})"
            ) from None
        self.names = {name for template in self.chain for name in template.blocks}

    def render(self, block: str, variables: Mapping[str, Any]) -> str:
        """The text of `block` ("" when no template in the chain defines it), rendered from fresh copies
        of `variables` (a template that changes them cannot change later renders)."""
        context = self.chain[0].new_context(copy.deepcopy(dict(variables)))
        for ancestor in self.chain[1:]:
            for name, function in ancestor.blocks.items():
                context.blocks.setdefault(name, []).append(function)
        if block not in context.blocks:
            return ""
        try:
            return self.env.render_blocks(context.blocks[block][0](context))
        except Exception as err:  # any failure inside a template is the template's fault
            raise self._error(*_template_line(err), f"block {block!r}: {type(err).__name__}: {err}") from None

    def _error(self, name: str | None, line: int | None, message: str) -> ProtocolError:
        """An error naming this protocol's template, and the inherited one where the error lies."""
        return _error(self.label, None if name == self.entry else name, line, message)


def _detect(template: str | os.PathLike[str]) -> _Source:
    if isinstance(template, os.PathLike):
        return _path_source(Path(template))
    if _shipped_file(template) is not None:
        return _Source(template.removesuffix(".jinja"), template)
    if "{%" in template or "{{" in template or "\n" in template:
        return _Source("<text>", "<text>", jinja2.DictLoader({"<text>": template}))
    if template.endswith(".jinja") or os.sep in template or Path(template).is_file():
        return _path_source(Path(template))
    names = ", ".join(shipped_protocols())
    raise ProtocolError(
        f"Unknown protocol {template!r}. Shipped protocols: {names} (Protocol.names() describes them)."
    )


def _path_source(path: Path) -> _Source:
    if not path.is_file():
        raise ProtocolError(f"Protocol template file not found: {str(path)!r}")
    return _Source(str(path), path.name, jinja2.FileSystemLoader(str(path.resolve().parent)))


# ---- reasoning --------------------------------------------------------------------------------


def _open_thinking(prefix: str) -> str:
    """`prefix` ending inside an opened reasoning section: "<think>\\n"."""
    stripped = prefix.rstrip()
    if stripped.endswith(THINK):
        return stripped + "\n"
    return prefix + THINK + "\n"


# ---- the protocol -----------------------------------------------------------------------------

Reasoning = bool | Literal["auto"]


class Protocol:
    """A collaboration protocol: a Jinja2 template rendered into a `RunScript` for each run.

    `Protocol("collaborate")` loads a shipped protocol (`Protocol.names()` lists them); a string with
    template syntax or a newline is template text, and a path (or a string ending in ".jinja") is a file.
    User templates may `{% extends "collaborate" %}` and override blocks.

    Options: `interjection_period` (generated tokens of a worker between interjections), `worker_names`
    (defaults to `WORKER_NAMES`), `strategies` and `examples` (template variables), `answer_format`
    ("boxed" or "text"), `reasoning` ("auto": open "<think>" when the model's chat template knows it),
    `render_timeout_s` and `max_render_chars` (bounds of each block's render: a template that runs
    longer, or builds or writes more text, fails with a ProtocolError), and extra template variables as
    `variables={...}` or keyword arguments. Every render starts from fresh copies of the variables.
    """

    def __init__(self, template: str | os.PathLike[str] = "collaborate", **options: Any) -> None:
        self._setup(_detect(template), **options)

    @classmethod
    def from_text(cls, text: str, *, name: str = "<text>", **options: Any) -> Protocol:
        """A protocol from template text; `name` labels it in error messages."""
        protocol = cls.__new__(cls)
        protocol._setup(_Source(name, name, jinja2.DictLoader({name: text})), **options)
        return protocol

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], **options: Any) -> Protocol:
        """A protocol from a template file; it may extend shipped templates or files next to it."""
        protocol = cls.__new__(cls)
        protocol._setup(_path_source(Path(path)), **options)
        return protocol

    @staticmethod
    def names() -> dict[str, str]:
        """Shipped protocol names with their one-line descriptions."""
        return shipped_protocols()

    def _setup(
        self,
        source: _Source,
        *,
        interjection_period: int = 1024,
        worker_names: Sequence[str] | None = None,
        variables: Mapping[str, Any] | None = None,
        strategies: Sequence[str] | None = None,
        examples: Sequence[str] | None = None,
        answer_format: Literal["boxed", "text"] = "boxed",
        reasoning: Reasoning = "auto",
        render_timeout_s: float = DEFAULT_TIMEOUT_S,
        max_render_chars: int = DEFAULT_MAX_CHARS,
        **extra: Any,
    ) -> None:
        self.name = source.label
        limits = RenderLimits(render_timeout_s, max_render_chars)
        self.interjection_period = _positive(interjection_period, "interjection_period")
        self.worker_names = _worker_names(worker_names)
        self.answer_format = _choice(answer_format, ("boxed", "text"), "answer_format")
        self.reasoning = _choice(reasoning, ("auto", True, False), "reasoning")
        self.variables = _user_variables({**(variables or {}), **extra})
        self.strategies = None if strategies is None else list(strategies)
        self.examples = list(examples or ())
        self._blocks = _Blocks(source, limits)
        missing = [block for block in REQUIRED_BLOCKS if block not in self._blocks.names]
        if missing:
            raise _error(
                self.name,
                None,
                None,
                f"missing required block(s): {', '.join(missing)} (define them, or inherit them with "
                '{% extends "collaborate" %})',
            )
        self._check_renders()

    def __repr__(self) -> str:
        return f"Protocol({self.name!r})"

    def _check_renders(self) -> None:
        """Render every block once per layout so that template errors surface at construction."""
        for layout in LAYOUTS:
            for n_workers in sorted({1, min(2, len(self.worker_names))}):
                self.render(None, "A task.", n_workers, layout).step_header(0, 1)

    # ---- rendering ----
    def _variables(self, n_workers: int, layout: str, tools: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            **self.variables,
            "workers": list(self.worker_names[:n_workers]),
            "n_workers": n_workers,
            "layout": layout,
            "tools": tools,
            "strategies": self.strategies,
            "examples": self.examples,
            "answer_format": self.answer_format,
        }

    def render(
        self,
        tokenizer: Any,
        messages: str | Sequence[Any],
        n_workers: int,
        layout: str = "combined",
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> RunScript:
        """The run script for `messages` with `n_workers` workers in `layout`.

        `tokenizer` supplies the chat template (None: a plain "Role:" layout). The protocol's rules plus
        the user's system text form the system message; the framing follows the generation prompt.
        """
        if not 1 <= n_workers <= len(self.worker_names):
            raise ValueError(
                f"n_workers must be between 1 and {len(self.worker_names)} (one per worker name)."
            )
        _choice(layout, LAYOUTS, "layout")
        base = self._variables(n_workers, layout, normalize_tools(tools))
        names = tuple(base["workers"])

        def worker_vars(worker: int) -> dict[str, Any]:
            return {**base, "worker": names[worker], "worker_index": worker}

        @lru_cache(maxsize=4096)
        def step_header(worker: int, step_index: int) -> str:
            return self._blocks.render("step_header", {**worker_vars(worker), "step": step_index})

        return RunScript(
            prompt=self._prompt(tokenizer, messages, base),
            worker_names=names,
            others_header=self._blocks.render("others_header", base),
            others_separator=self._blocks.render("others_separator", base),
            own_headers=tuple(self._blocks.render("own_header", worker_vars(w)) for w in range(n_workers)),
            step_header=step_header,
            is_step_end=is_step_end,
            interjection=self._blocks.render("interjection", base) or None,
            interjection_period=self.interjection_period,
            finisher=self._blocks.render("finisher", base),
            extract_answer=extract_answer,
        )

    def _prompt(self, tokenizer: Any, messages: str | Sequence[Any], base: Mapping[str, Any]) -> MarkedText:
        chat = normalize_messages(messages)
        user_system = [m["content"] for m in chat if m["role"] == "system" and m["content"].strip()]
        system = "\n\n".join([self._blocks.render("system", base).strip(), *user_system])
        chat = [{"role": "system", "content": system}, *(m for m in chat if m["role"] != "system")]
        knows_think = chat_template.knows_thinking(tokenizer)
        think = knows_think if self.reasoning == "auto" else bool(self.reasoning)
        kwargs = {"enable_thinking": think} if knows_think else {}
        prefix = chat_template.render(tokenizer, chat, **kwargs)
        if think:
            prefix = prefix.rebase(_open_thinking(prefix))
        return prefix + self._blocks.render("opening", base)  # contents stay marked untrusted


# ---- option checks ----------------------------------------------------------------------------


def _positive(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}.")
    return value


def _choice(value: Any, allowed: Sequence[Any], what: str) -> Any:
    if not any(value is a or (isinstance(a, str) and value == a) for a in allowed):
        raise ValueError(f"{what} must be one of {', '.join(map(repr, allowed))}; got {value!r}.")
    return value


def _worker_names(names: Sequence[str] | None) -> tuple[str, ...]:
    result = tuple(WORKER_NAMES if names is None else names)
    if not result or any(not isinstance(n, str) or not n.strip() for n in result):
        raise ValueError("worker_names must be non-empty strings.")
    if len(set(result)) != len(result):
        raise ValueError(f"worker_names must be distinct, got {list(result)}.")
    return result


def _user_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
    clash = sorted(RESERVED_VARIABLES.intersection(variables))
    if clash:
        raise ValueError(f"Template variables {clash} are set by the protocol itself; use other names.")
    bad = [key for key in variables if not str(key).isidentifier()]
    if bad:
        raise ValueError(f"Template variable names must be identifiers, got {bad}.")
    try:
        return copy.deepcopy(dict(variables))  # each render gets fresh copies of these
    except Exception as error:
        raise InvalidArgumentError(
            f"Template variables must be copyable values (text, numbers, lists, dicts): {error}"
        ) from None
