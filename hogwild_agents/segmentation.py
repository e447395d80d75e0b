"""Step segmentation: where a worker's step ends.

A step ends at a paragraph break (a blank line), but never inside an open code fence (a run of three
or more backticks) or an open display-math block (`$$ ... $$` or `\\[ ... \\]`): a blank line there is
part of the block, not the end of the step.
"""

from __future__ import annotations

import re

# Markers that open or close a block, scanned left to right. `\\\\` (a LaTeX line break) is matched
# first so that `\\[2pt]` is not read as the start of a math block.
_MARKER = re.compile(r"\\\\|`{3,}|\$\$|\\\[|\\\]")
_CLOSER = {"$$": "$$", "\\[": "\\]"}  # math openers and the marker that closes each


def open_block(text: str) -> str | None:
    """The kind of block left open at the end of `text`: "code", "math", or None when all are closed."""
    closer: str | None = None  # what closes the open block: "$$", "\\]", or a fence (backticks)
    for match in _MARKER.finditer(text):
        marker = match.group()
        if closer is None:
            closer = marker if marker.startswith("```") else _CLOSER.get(marker)
        elif marker == closer or (closer[0] == "`" == marker[0] and len(marker) >= len(closer)):
            closer = None
    if closer is None:
        return None
    return "code" if closer[0] == "`" else "math"


def ends_with_blank_line(text: str) -> bool:
    """True when `text` ends with a blank line: its trailing whitespace holds at least two newlines."""
    body = text.rstrip()
    return body != "" and text[len(body) :].count("\n") >= 2


def is_step_end(step_text: str) -> bool:
    """True when a step is finished: it ends with a blank line that is not inside an open block."""
    return ends_with_blank_line(step_text) and open_block(step_text) is None
