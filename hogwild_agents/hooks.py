"""In-engine tools and run callbacks.

A tool call written by ANY worker runs inside the run: the caller pauses (the others keep generating),
the tool runs in a thread with a timeout, and its result becomes a block of the shared history that
every worker's view holds from the next step on. Failures of every kind (an exception, a timeout, a
malformed or unknown call, output that is not text) become visible error results; the run goes on.
Only registered tools run, and nothing in model output is ever evaluated.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hogwild_agents import validation
from hogwild_agents.tool_calls import ParsedToolCall
from hogwild_agents.tool_schemas import callable_function, is_langchain_tool, langchain_function

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RESULT_CHARS = 2000


@dataclass(frozen=True)
class EngineTool:
    """A callable the engine may run: `func(**arguments)`, sync or async, described by an OpenAI schema."""

    name: str
    description: str
    parameters: dict[str, Any]
    func: Callable[..., Any]

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI-format tool schema rendered into prompts."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    @classmethod
    def from_any(cls, tool: Any) -> EngineTool:
        """Wrap a LangChain tool (`@tool`, BaseTool), an EngineTool, or a plain typed, documented callable."""
        if isinstance(tool, EngineTool):
            return tool
        if is_langchain_tool(tool):  # langchain-core is imported only here (the `langchain` extra)
            function, func = langchain_function(tool), _langchain_caller(tool)
        elif callable(tool):
            function, func = callable_function(tool), tool
        else:
            raise TypeError(f"Cannot use {tool!r} as a tool: pass a LangChain tool or a callable.")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        return cls(function["name"], function.get("description", ""), parameters, func)


def _langchain_caller(tool: Any) -> Callable[..., Any]:
    def call(**arguments: Any) -> Any:
        try:
            return tool.invoke(arguments)
        except NotImplementedError:  # async-only tools
            return asyncio.run(tool.ainvoke(arguments))

    return call


@dataclass
class Hooks:
    """Callbacks a run calls: on_step(record), on_token(worker, text), on_tool_call(call),
    on_tool_result(call), on_step_finished(worker, step_text). Exceptions in callbacks propagate."""

    on_step: Callable[[Any], None] | None = None
    on_token: Callable[[int, str], None] | None = None
    on_tool_call: Callable[[ToolCall], None] | None = None
    on_tool_result: Callable[[ToolCall], None] | None = None
    on_step_finished: Callable[[int, str], None] | None = None


@dataclass
class ToolCall:
    """One call made by a worker, and (once done) its result."""

    id: str
    worker: int
    worker_name: str
    name: str | None
    arguments: dict[str, Any]
    raw: str
    step: int
    result: str | None = None
    error: bool = False
    future: Future | None = field(default=None, repr=False)
    started: float = field(default_factory=time.monotonic, repr=False)
    finished: float | None = field(default=None, repr=False)  # when the tool returned

    @property
    def done(self) -> bool:
        return self.result is not None


def stringify(value: Any) -> str:
    """Tool output as text: bytes decoded (invalid UTF-8 replaced), objects as JSON where possible, lone
    surrogates replaced. Never raises."""
    try:
        text = _as_text(value)
    except Exception as exc:  # an object whose str() raises, nesting too deep to serialize, ...
        text = f"<{type(value).__name__} that cannot be shown as text: {type(exc).__name__}>"
    return text.encode("utf-8", errors="replace").decode("utf-8")  # no lone surrogates


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    content = getattr(value, "content", None)  # a LangChain ToolMessage
    if isinstance(content, str):
        return content
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return str(value)


class DaemonExecutor:
    """A thread pool whose threads never hold up interpreter exit (concurrent.futures joins its own at
    exit, so one tool that never returns would keep the process alive). At most `max_workers` calls
    run at once; `shutdown` cancels the calls that have not started."""

    def __init__(self, max_workers: int, thread_name_prefix: str) -> None:
        self.max_workers = validation.positive_integer(max_workers, "max_parallel")
        self.prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[tuple[Future, Callable[..., Any], tuple[Any, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, func: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("The tool runner is closed; start a new run.")
            self._queue.put((future, func, args))
            if len(self._threads) < self.max_workers:  # threads start on demand, then stay for more calls
                thread = threading.Thread(
                    target=self._work, name=f"{self.prefix}_{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, func, args = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(func(*args))
                except BaseException as exc:  # the caller sees it through the future
                    future.set_exception(exc)
            del item, future, func, args  # hold no result while idle
            if self._closed:
                return

    def shutdown(self) -> None:
        """Cancel every call not yet started and let idle threads end; running calls are abandoned."""
        with self._lock:
            self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
            for _ in self._threads:
                self._queue.put(None)


class ToolRunner:
    """Runs registered tools for one engine, each call in a thread, each with a timeout."""

    def __init__(
        self,
        tools: Sequence[Any],
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_result_chars: int = DEFAULT_MAX_RESULT_CHARS,
        max_parallel: int = 4,
    ) -> None:
        self.tools = {t.name: t for t in (EngineTool.from_any(tool) for tool in tools)}
        self.timeout_s = validation.timeout(timeout_s, "tool_timeout_s", optional=False)
        self.max_result_chars = validation.positive_integer(max_result_chars, "max_result_chars")
        self.executor = DaemonExecutor(max_parallel, thread_name_prefix="hogwild-tool")
        self._counter = 0
        self._lock = threading.Lock()

    @property
    def schemas(self) -> list[dict[str, Any]]:
        return [t.schema for t in self.tools.values()]

    def submit(self, parsed: ParsedToolCall, worker: int, worker_name: str, step: int) -> ToolCall:
        """Start a call (or settle it at once with an error result if it cannot run)."""
        with self._lock:
            self._counter += 1
            call_id = f"call_{self._counter}"
        call = ToolCall(call_id, worker, worker_name, parsed.name, parsed.arguments, parsed.raw, step)
        if not parsed.valid:
            self._settle(call, f"Error: malformed tool call: {parsed.error}.", error=True)
        elif parsed.name not in self.tools:
            known = ", ".join(sorted(self.tools)) or "none"
            self._settle(call, f"Error: unknown tool {parsed.name!r}; available tools: {known}.", error=True)
        else:
            call.future = self.executor.submit(self._invoke, self.tools[parsed.name], parsed.arguments)
            call.future.add_done_callback(lambda _: setattr(call, "finished", time.monotonic()))
        return call

    @staticmethod
    def _invoke(tool: EngineTool, arguments: dict[str, Any]) -> Any:
        result = tool.func(**arguments)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        return result

    def poll(self, call: ToolCall, wait: bool = False) -> bool:
        """Settle `call` if its tool finished (or timed out); with `wait`, block until it does."""
        if call.done:
            return True
        assert call.future is not None
        remaining = self.timeout_s - (time.monotonic() - call.started)
        if not wait and not call.future.done() and remaining > 0:
            return False
        try:
            value = call.future.result(timeout=max(remaining, 0))
            if call.finished is not None and call.finished - call.started > self.timeout_s:
                raise TimeoutError  # it returned, but after its deadline
        except TimeoutError:
            call.future.cancel()
            self._settle(call, f"Error: {call.name} timed out after {self.timeout_s:g} s.", error=True)
        except Exception as exc:  # a failing tool is a visible result, never a crash
            self._settle(call, f"Error: {call.name} raised {type(exc).__name__}: {exc}", error=True)
        else:
            self._settle(call, stringify(value), error=False)
        return True

    def _settle(self, call: ToolCall, text: str, error: bool) -> None:
        if len(text) > self.max_result_chars:
            dropped = len(text) - self.max_result_chars
            text = text[: self.max_result_chars] + f"\n[... output truncated: {dropped} more characters]"
        call.result, call.error = text, error

    def close(self) -> None:
        self.executor.shutdown()


async def _await(awaitable: Any) -> Any:
    return await awaitable
