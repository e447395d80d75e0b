"""Small tools shipped with the library: a safe calculator and a local document search."""

from __future__ import annotations

import ast
import math
import operator
import re
from collections.abc import Callable, Iterable

from hogwild_agents.hooks import EngineTool

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[float], float]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {"sqrt": math.sqrt, "abs": abs, "round": round}
_MAX_EXPONENT = 1000


def evaluate_arithmetic(expression: str) -> float | int:
    """Evaluate + - * / // % ** on numbers (and sqrt/abs/round) by walking the syntax tree; nothing else."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from err

    def walk(node: ast.AST) -> float | int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left), walk(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
                raise ValueError("exponent too large")
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](walk(node.operand))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS
            and not node.keywords
        ):
            return _FUNCTIONS[node.func.id](*(walk(arg) for arg in node.args))
        raise ValueError(f"unsupported element in expression: {ast.dump(node)[:60]}")

    return walk(tree)


def calculator_tool() -> EngineTool:
    def calculator(expression: str) -> str:
        value = evaluate_arithmetic(expression)
        return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)

    return EngineTool(
        name="calculator",
        description="Evaluate an arithmetic expression, e.g. '17 * 23 + 4'.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string", "description": "the arithmetic expression"}},
            "required": ["expression"],
        },
        func=calculator,
    )


def document_search_tool(documents: dict[str, str] | Iterable[tuple[str, str]], top_k: int = 2) -> EngineTool:
    """Keyword search over a small in-memory collection {title: text}; returns the best matches."""
    docs = dict(documents)

    def words(text: str) -> set[str]:
        return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) > 2}

    def search_documents(query: str) -> str:
        wanted = words(query)
        scored = sorted(((len(wanted & words(t + " " + body)), t) for t, body in docs.items()), reverse=True)
        hits = [(score, title) for score, title in scored[:top_k] if score > 0]
        if not hits:
            return "No document matches the query."
        return "\n".join(f"{title}: {docs[title]}" for _, title in hits)

    return EngineTool(
        name="search_documents",
        description="Search the local documents by keywords and return the best matching passages.",
        parameters={
            "type": "object",
            "properties": {"query": {"type": "string", "description": "keywords to look for"}},
            "required": ["query"],
        },
        func=search_documents,
    )
