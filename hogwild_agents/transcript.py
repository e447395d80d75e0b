"""A self-contained HTML page of a finished run: every worker's text colour-coded in time order."""

from __future__ import annotations

import html
from collections.abc import Iterable

from hogwild_agents.results import HogwildResult, TraceEvent

WORKER_COLOURS = (
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b",
)  # fmt: skip
SHARED_COLOUR = "#555555"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; max-width: 1200px; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.legend span { margin-right: 1rem; font-weight: 600; }
.timeline { white-space: pre-wrap; line-height: 1.5; border: 1px solid #ddd; padding: 1rem;
  border-radius: 6px; }
.turn { display: block; margin: 0.2rem 0; padding-left: 0.5rem; border-left: 4px solid; }
.turn .who { font-weight: 600; font-size: 0.8rem; margin-right: 0.5rem; }
.columns { display: grid; gap: 1rem; }
.column { white-space: pre-wrap; border-top: 4px solid; padding: 0.5rem; background: #fafafa; }
.answer { font-size: 1.2rem; padding: 1rem; background: #eef6ee; border-radius: 6px; white-space: pre-wrap; }
.meta { color: #666; font-size: 0.9rem; }
.kind-inject, .kind-tool_result { font-style: italic; }
"""


def worker_colour(worker: int | None) -> str:
    return SHARED_COLOUR if worker is None else WORKER_COLOURS[worker % len(WORKER_COLOURS)]


def merge_turns(trace: Iterable[TraceEvent]) -> list[tuple[int | None, str, str]]:
    """Events gathered into readable turns, in the order they completed: a worker's text becomes a turn
    when it ends a non-blank line; shared blocks are turns of their own.
    Returns (worker, first kind, text) tuples."""
    turns: list[tuple[int | None, str, str]] = []
    open_turns: dict[int, tuple[str, str]] = {}
    for event in trace:
        if event.worker is None:
            turns.append((None, event.kind, event.text))
            continue
        kind, text = open_turns.pop(event.worker, (event.kind, ""))
        text += event.text
        if "\n" in event.text and text.strip():
            turns.append((event.worker, kind, text))
        else:
            open_turns[event.worker] = (kind, text)
    turns.extend((worker, kind, text) for worker, (kind, text) in sorted(open_turns.items()))
    return turns


def render_html(result: HogwildResult, title: str = "Hogwild run") -> str:
    """The page: final answer, legend, the interleaved timeline, each worker's full text, usage."""
    names = [w.name for w in result.workers]
    esc = html.escape
    legend = "".join(f'<span style="color:{worker_colour(i)}">{esc(n)}</span>' for i, n in enumerate(names))
    turns = []
    for worker, kind, text in merge_turns(result.trace):
        who = "shared" if worker is None else names[worker]
        colour = worker_colour(worker)
        turns.append(
            f'<span class="turn kind-{esc(kind)}" style="border-color:{colour};color:{colour}">'
            f'<span class="who">{esc(who)}</span>{esc(text)}</span>'
        )
    columns = "".join(
        f'<div class="column" style="border-color:{worker_colour(i)}"><b>{esc(w.name)}</b> '
        f'<span class="meta">({esc(str(w.finish_reason))}, {w.generated_tokens} tokens)</span>\n'
        f"{esc(w.text)}</div>"
        for i, w in enumerate(result.workers)
    )
    usage = result.usage
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{esc(title)}</h1>
<h2>Final answer</h2>
<div class="answer">{esc(result.final_text.strip())}</div>
<p class="meta">{len(names)} workers &middot; {result.steps} steps
&middot; prompt {usage.prompt_tokens} tokens &middot; generated {usage.generated_tokens}
&middot; model processed {usage.forward_tokens}</p>
<h2>Timeline</h2>
<div class="legend">{legend}<span style="color:{SHARED_COLOUR}">shared</span></div>
<div class="timeline">{"".join(turns)}</div>
<h2>Workers</h2>
<div class="columns" style="grid-template-columns: repeat({min(len(names), 4)}, 1fr)">{columns}</div>
</body></html>
"""
