"""What a run needs from a collaboration protocol: the rendered texts and a few rules.

`RunScript` is the narrow contract between the protocol layer (templates) and the generation loop.
The loop never renders templates itself; it only reads a script. `RunScript.raw` is the protocol-free
script (no names, no headers): with one worker it is ordinary generation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hogwild_agents.encoding import MarkedText
from hogwild_agents.segmentation import is_step_end

_FIELD = re.compile(r"\{(tool|worker|result)\}")


@dataclass(frozen=True)
class RunScript:
    """Everything the generation loop takes from a protocol, already rendered to text.

    Attributes:
        prompt: the shared prefix every worker's view starts with (chat template applied).
        worker_names: one display name per worker.
        others_header: combined layout only: text placed before the other workers' in-progress steps.
        others_separator: combined layout only: text placed between two of those in-progress steps.
        own_headers: combined/interleaved layouts: per worker, text placed before its own in-progress step.
        step_header: `(worker, step_index) -> text` opening each new step block of a worker (step_index
            counts from 1). In the contiguous layout only step 1 opens a block.
        is_step_end: `(step_text) -> bool`, True when a worker's current step is finished and may move
            into the shared history (interleaved/combined layouts). Default: `segmentation.is_step_end`
            (a blank line outside code fences and display math).
        interjection: text forced into a worker's stream every `interjection_period` generated tokens of
            that worker; None disables interjections.
        finisher: suffix that forces a final answer when the budget ends without one ("" disables).
        extract_answer: `(text) -> answer or None`, the final answer found in a worker's text.
        tool_result: format of the shared block an in-engine tool's result becomes, with the fields
            {tool}, {worker} and {result}.
    """

    prompt: str
    worker_names: tuple[str, ...]
    others_header: str = ""
    others_separator: str = ""
    own_headers: tuple[str, ...] = ()
    step_header: Callable[[int, int], str] = field(default=lambda worker, step: "")
    is_step_end: Callable[[str], bool] = field(default=is_step_end)
    interjection: str | None = None
    interjection_period: int = 1024
    finisher: str = ""
    extract_answer: Callable[[str], str | None] = field(default=lambda text: None)
    tool_result: str = "[{tool}] called by {worker} \u2192 {result}\n\n"

    def tool_result_block(self, tool: str, worker: str, result: str) -> MarkedText:
        """The shared block of a tool's result: `tool_result` with its fields filled in; the template's
        text is trusted, the fields' text (the tool's name and output, the caller's name) is not."""
        fields = {"tool": tool, "worker": worker, "result": result}
        pieces, position = [], 0
        for match in _FIELD.finditer(self.tool_result):
            pieces += [(self.tool_result[position : match.start()], True), (fields[match.group(1)], False)]
            position = match.end()
        return MarkedText.join([*pieces, (self.tool_result[position:], True)])

    def own_header(self, worker: int) -> str:
        return self.own_headers[worker] if self.own_headers else ""

    @classmethod
    def raw(cls, prompt: str, n_workers: int) -> RunScript:
        """A protocol-free script: the prompt verbatim, no names, no headers, no interjections."""
        names = tuple(f"worker{i}" for i in range(n_workers))
        return cls(prompt=prompt, worker_names=names)
