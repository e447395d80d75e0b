"""The runs started inside one `astream`, so that closing the stream stops every one of them.

`BaseChatModel.astream` does not close `_astream` when it is closed itself (the generator is only
finalized later, by the garbage collector), so `ChatHogwild.astream` cancels its calls' runs through
this group when it ends: the run stops at its next step boundary and its cache is released.
"""

from __future__ import annotations

from contextvars import ContextVar

from hogwild_agents.handle import RunHandle


class CallGroup:
    """Handles of the runs started inside one stream."""

    def __init__(self) -> None:
        self._handles: list[RunHandle] = []

    def add(self, handle: RunHandle) -> None:
        self._handles.append(handle)

    async def stop(self) -> None:
        """Cancel every run still going and wait until each has stopped."""
        for handle in self._handles:
            await handle.acancel()
        self._handles.clear()


stream_calls: ContextVar[CallGroup | None] = ContextVar("hogwild_stream_calls", default=None)
