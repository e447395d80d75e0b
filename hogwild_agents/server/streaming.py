"""Streaming a call: ChatHogwild's message chunks as chat.completion.chunk objects (server-sent events),
and a stream that stops its run when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from langchain_core.messages import AIMessageChunk

from hogwild_agents.server.convert import Call, finish_reason, openai_tool_calls, usage

T = TypeVar("T")
DONE = "data: [DONE]\n\n"
CLOSE_TIMEOUT_S = 30.0  # a closed stream waits at most this long for its run to stop (one step)


def sse(data: dict[str, Any]) -> str:
    """One server-sent event carrying `data` as JSON."""
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ChunkWriter:
    """Builds one call's chat.completion.chunk objects from ChatHogwild's message chunks.

    The first chunk opens the assistant's message; each worker's writing follows as `reasoning_content`
    deltas (and `reasoning`, vLLM's newer name) with `hogwild_worker: {"index", "name"}`; then the
    answer as `content` deltas, tool calls as `tool_calls` deltas, a chunk with the finish reason, and
    (with `stream_options.include_usage`) a last chunk with no choices and the usage."""

    def __init__(self, call: Call, count_tokens: Callable[[str], int]) -> None:
        self.call = call
        self.count_tokens = count_tokens
        self.answer = ""

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self.call.id,
            "object": "chat.completion.chunk",
            "created": self.call.created,
            "model": self.call.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def opening(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""})

    def feed(self, message: AIMessageChunk) -> list[dict[str, Any]]:
        chunks = [self._chunk(delta) for delta in self._deltas(message.content)]
        if message.chunk_position == "last":
            chunks += self._ending(message)
        return chunks

    def _deltas(self, content: str | list[Any]) -> list[dict[str, Any]]:
        if isinstance(content, str):
            return [self._answer(content)] if content else []
        deltas = []
        for block in content:
            if isinstance(block, str):
                text, kind = block, "text"
            else:
                kind = block.get("type")
                text = block.get("reasoning" if kind == "reasoning" else "text") or ""
            if not text:
                continue
            if kind == "reasoning":
                extras = block.get("extras") or {}
                worker = {"index": extras.get("worker", block.get("index")), "name": extras.get("name")}
                deltas.append({"reasoning_content": text, "reasoning": text, "hogwild_worker": worker})
            elif kind == "text":
                deltas.append(self._answer(text))
        return deltas

    def _answer(self, text: str) -> dict[str, Any]:
        self.answer += text
        return {"content": text}

    def _ending(self, message: AIMessageChunk) -> list[dict[str, Any]]:
        chunks = []
        calls = openai_tool_calls(_complete(message), self.call.parallel_tool_calls)
        if calls:
            chunks.append(self._chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}))
        reason = finish_reason(message.response_metadata.get("finish_reason"))
        chunks.append(self._chunk({}, finish=reason))
        if self.call.include_usage:
            counts = usage(message, self.answer, self.call.reasoning, self.count_tokens)
            chunks.append({**self._chunk({}), "choices": [], "usage": counts})
        return chunks


def _complete(chunk: AIMessageChunk) -> AIMessageChunk:
    """The last chunk's tool call chunks (each one complete) parsed into tool calls."""
    return AIMessageChunk(content="", tool_call_chunks=chunk.tool_call_chunks)


async def disconnected(receive: Callable[[], Awaitable[dict[str, Any]]]) -> None:
    """Returns once the ASGI client has disconnected (the request body having been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class ClientGone(Exception):
    """The client disconnected before the call ended."""


class GuardedStream(AsyncIterator[T]):
    """The items of `source`, read in a task of its own, until it ends or `gone` completes (the client
    disconnected: iteration raises ClientGone). `aclose()` closes `source` (which cancels its run) and
    waits until it has closed; call it in a `finally`."""

    def __init__(self, source: AsyncIterator[T], gone: Coroutine[Any, Any, None]) -> None:
        self._queue: asyncio.Queue[tuple[Any, BaseException | None]] = asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read(source))
        self._gone = asyncio.ensure_future(gone)
        self._ended = False

    async def _read(self, source: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(source):  # type: ignore[type-var]
                async for item in source:
                    self._queue.put_nowait((item, None))
        except Exception as error:
            self._queue.put_nowait((StopAsyncIteration, error))
        else:
            self._queue.put_nowait((StopAsyncIteration, None))

    def __aiter__(self) -> GuardedStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._ended:
            raise StopAsyncIteration
        if self._queue.empty():
            getter = asyncio.ensure_future(self._queue.get())
            await asyncio.wait({getter, self._gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                raise ClientGone
            item, error = getter.result()
        else:
            item, error = self._queue.get_nowait()
        if item is StopAsyncIteration:
            self._ended = True
            if error is not None:
                raise error
            raise StopAsyncIteration
        return item

    async def aclose(self) -> None:
        self._gone.cancel()
        if not self._reader.done():
            self._reader.cancel()  # the source's run is cancelled and stops at its next step
            await asyncio.wait({self._reader}, timeout=CLOSE_TIMEOUT_S)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._gone


async def unless_gone(work: Coroutine[Any, Any, T], gone: Coroutine[Any, Any, None]) -> T:
    """The result of `work`, or ClientGone once `gone` completes first (`work` is then cancelled, and
    awaited until it has stopped)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
