"""Streaming a call: live answer text and the workers' writing as message chunks."""

from __future__ import annotations

from collections.abc import Sequence

from langchain_core.messages import AIMessageChunk
from langchain_core.outputs import ChatGenerationChunk

from hogwild_agents.results import TokenEvent


class LiveText:
    """Emits a stream's text as it grows, except a tail that could begin one of `holds`; `finish`
    returns what remains so that everything emitted equals the final text."""

    def __init__(self, holds: Sequence[str] = ()) -> None:
        self.holds = [h for h in holds if h]
        self.text = ""
        self.emitted = ""
        self.stopped = False

    def _held_length(self) -> int:
        longest = 0
        for hold in self.holds:
            for length in range(min(len(hold), len(self.text)), 0, -1):
                if hold.startswith(self.text[-length:]):
                    longest = max(longest, length)
                    break
        return longest

    def feed(self, delta: str) -> str:
        if self.stopped or not delta:
            return ""
        self.text += delta
        if any(hold in self.text for hold in self.holds):
            self.stopped = True
            return ""
        safe = self.text[: len(self.text) - self._held_length()].strip()
        new = safe[len(self.emitted) :] if safe.startswith(self.emitted) else ""
        self.emitted += new
        return new

    def finish(self, final_text: str) -> str:
        """The rest of `final_text` (empty when what was emitted is not its prefix)."""
        if final_text.startswith(self.emitted):
            rest = final_text[len(self.emitted) :]
            self.emitted = final_text
            return rest
        return ""


class ChunkMaker:
    """Turns one call's run events into message chunks while the workers write.

    - `answer_holds` given (a raw run whose answer is worker 0's plain text): worker 0's text streams as
      content as it is written, holding back a tail that may still turn into one of the holds.
    - `reasoning` (a protocol run): every worker's writing streams as standard reasoning content blocks
      (`index` = the worker, `extras` = its index and name), and the answer follows as a text block
      (index `n_workers`) when the run ends; blocks with one index merge into one when chunks are added.
    """

    def __init__(self, answer_holds: Sequence[str] | None, reasoning: bool, n_workers: int) -> None:
        self.live = LiveText(answer_holds) if answer_holds is not None else None
        self.reasoning = reasoning
        self.n_workers = n_workers
        self.streamed_blocks = False

    def feed(self, event: object) -> list[ChatGenerationChunk]:
        if not isinstance(event, TokenEvent) or not event.text:
            return []
        if self.live is not None:
            delta = self.live.feed(event.text) if event.worker == 0 else ""
            return [ChatGenerationChunk(message=AIMessageChunk(content=delta))] if delta else []
        if not self.reasoning:
            return []
        self.streamed_blocks = True
        block = {
            "type": "reasoning",
            "reasoning": event.text,
            "index": event.worker,
            "extras": {"worker": event.worker, "name": event.name},
        }
        return [ChatGenerationChunk(message=AIMessageChunk(content=[block]))]

    def finish(self, final_text: str) -> str | list[dict]:
        """The last chunk's content: the rest of the answer."""
        if self.live is not None:
            return self.live.finish(final_text)
        if self.streamed_blocks and final_text:
            return [{"type": "text", "text": final_text, "index": self.n_workers}]
        return final_text
