"""A live terminal view of a run: one coloured column per worker, the shared history, a token budget bar."""

from __future__ import annotations

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from hogwild_agents.cache import SHARED
from hogwild_agents.results import StepRecord
from hogwild_agents.run import HogwildRun

RICH_COLOURS = ("blue", "red", "green", "magenta", "dark_orange", "cyan", "deep_pink3", "yellow4")
TAIL_LINES = 14


def tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


class LiveView:
    """Renders a run after each step; use as a context manager around the stepping loop."""

    def __init__(
        self, run: HogwildRun, console: Console | None = None, refresh_per_second: float = 8
    ) -> None:
        self.run = run
        self.console = console or Console()
        self.budget = sum(w.budget for w in run.workers)
        if run.limits.max_total_tokens is not None:
            self.budget = min(self.budget, run.limits.max_total_tokens)
        self.events: list[str] = []
        self.live = Live(self.render(), console=self.console, refresh_per_second=refresh_per_second)

    def __enter__(self) -> LiveView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.update(self.render())
        self.live.__exit__(*exc)

    def update(self, record: StepRecord) -> None:
        for worker, text in record.texts.items():
            if record.sources.get(worker) == "interjection":
                self.events.append(f"{self.run.workers[worker].name}: {text.strip()}")
        self.live.update(self.render())

    def note(self, message: str) -> None:
        """Show an event line (a tool call, a tool result, an injected block)."""
        self.events.append(message)
        self.live.update(self.render())

    def render(self) -> RenderableType:
        run = self.run
        columns = Table.grid(expand=True, padding=(0, 1))
        panels = []
        for w in run.workers:
            colour = RICH_COLOURS[w.index % len(RICH_COLOURS)]
            status = w.finish_reason or ("writing" if not w.closing else "finishing a step")
            panels.append(
                Panel(
                    Text(tail(w.text, TAIL_LINES), style=colour),
                    title=f"[bold {colour}]{w.name}[/] [dim]{status}[/]",
                    border_style=colour,
                    height=TAIL_LINES + 2,
                )
            )
        for _ in panels[:4]:
            columns.add_column(ratio=1)
        for start in range(0, len(panels), 4):
            row = panels[start : start + 4]
            columns.add_row(*row, *([""] * (min(len(panels), 4) - len(row))))
        history_ids = run.cache.token_ids(SHARED)[run.prompt_tokens :]
        history = Panel(
            Text(tail(run.engine.decode(history_ids), 6) or "(no finished steps yet)", style="dim"),
            title="shared history",
            border_style="grey50",
            height=8,
        )
        generated = sum(w.generated for w in run.workers)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(
            ProgressBar(total=self.budget, completed=min(generated, self.budget), width=40),
            f"{generated}/{self.budget} tokens · step {run.steps_taken}",
        )
        parts: list[RenderableType] = [columns, history]
        if self.events:
            parts.append(Panel("\n".join(self.events[-4:]), title="events", border_style="yellow", height=6))
        parts.append(bar)
        return Group(*parts)
