"""Live answer text: a worker's deltas, holding back what may still turn into a stop string."""

from __future__ import annotations

from collections.abc import Sequence


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
