"""The eval report: accuracy against forward passes (and wall time) per configuration, as a PNG and a
self-contained HTML page (the picture embedded) with every problem's answers linked to the transcripts
of their runs. Given two databases, it puts them side by side: both in one plot (the second dashed)
and their accuracies in one table.

Forward passes are a run's forwards after its prompt (every step, chunked write, re-prefill and the
finisher's answer; the prompt's prefill not); with forward-pass budgets every method is capped at the
budget, so the left plot's x-axis is the budget itself. A vote's samples run side by side in one batch,
so a vote counts the forward passes and the wall time of its longest sample (its latency) and the tokens
of all its samples (its cost). Wall time is measured per run, from its own start to its own end inside
the batch. Costs per correct answer are a point's total tokens, forward passes and seconds over its
correct rows.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import textwrap
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from hogwild_agents.errors import EvalError
from hogwild_agents.evaluation.datasets import INSTALL_HINT, Problem
from hogwild_agents.evaluation.grid import Config, RunSpec
from hogwild_agents.evaluation.stats import Paired, paired_test, wilson
from hogwild_agents.evaluation.store import ResultRow, ResultStore

COLOURS = (
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2", "#8c564b", "#7f7f7f",
    "#bcbd22",
)  # fmt: skip
LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
# colour, line style and marker cycle with co-prime periods (10, 4, 7): the first 140 lines all differ
PLOT_NAME = "accuracy.png"
PAGE_NAME = "report.html"


@dataclass(frozen=True)
class Point:
    """A configuration at one budget, over the problems it has rows for."""

    config: Config
    budget: int
    problems: int
    correct: int
    forward_passes: float  # mean per problem
    tokens: float  # mean generated tokens per problem
    wall_s: float  # mean per problem
    score: float = 0.0  # mean score (partial credit of a generator's scorer included)
    seeds: int = 1  # replicate seeds pooled into the point

    def per_correct(self, mean: float) -> float:
        """A mean cost per row as the cost per correct answer (all rows' cost over the correct ones;
        inf when none is correct)."""
        return mean * self.problems / self.correct if self.correct else math.inf

    @property
    def accuracy(self) -> float:
        return self.correct / self.problems

    @property
    def stderr(self) -> float:
        """The binomial standard error of the accuracy."""
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.problems)

    @property
    def interval(self) -> tuple[float, float]:
        """The Wilson 95% interval of the accuracy."""
        return wilson(self.correct, self.problems)


@dataclass
class Source:
    """One results database as the report reads it."""

    name: str
    meta: dict[str, str]
    problems: list[Problem]
    configs: list[Config]
    rows: list[ResultRow]
    store: ResultStore

    @classmethod
    def read(cls, path: str | Path, name: str) -> Source:
        store = ResultStore.open_existing(path)
        return cls(name, store.meta(), store.problems(), store.configs(), store.results(), store)

    def points(self) -> list[Point]:
        return summarise(self.rows, self.configs)


def summarise(rows: Sequence[ResultRow], configs: Sequence[Config]) -> list[Point]:
    """One point per configuration and budget, in configuration order, budgets ascending."""
    groups: dict[tuple[str, int], list[ResultRow]] = defaultdict(list)
    for row in rows:
        groups[row.config, row.budget].append(row)
    points = []
    for config in configs:
        for budget in sorted(b for name, b in groups if name == config.key):
            group = groups[config.key, budget]
            n = len(group)
            points.append(
                Point(
                    config,
                    budget,
                    n,
                    sum(r.correct for r in group),
                    sum(r.forward_passes for r in group) / n,
                    sum(r.tokens for r in group) / n,
                    sum(r.wall_s for r in group) / n,
                    sum(r.score for r in group) / n,
                    len({_seed(r) for r in group}),
                )
            )
    return points


def _seed(row: ResultRow) -> int:
    return row.seed


def paired_tests(rows: Sequence[ResultRow], configs: Sequence[Config]) -> list[Paired]:
    """Exact McNemar tests between every two configurations at each budget they share, paired on
    (problem, seed)."""
    correct: dict[tuple[str, int], dict[tuple, bool]] = defaultdict(dict)
    for row in rows:
        correct[row.config, row.budget][row.problem, _seed(row)] = row.correct
    tests = []
    budgets = sorted({budget for _, budget in correct})
    for budget in budgets:
        names = [c.key for c in configs if (c.key, budget) in correct]
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                tests.append(paired_test(a, b, budget, correct[a, budget], correct[b, budget]))
    return tests


# ---- the picture ------------------------------------------------------------------------------


def by_forwards(source: Source) -> bool:
    """Whether the database's budgets are forward-pass caps (else tokens per worker)."""
    return source.meta.get("budget_unit", "tokens") == "forwards"


def plot_png(sources: Sequence[Source]) -> bytes:
    """Accuracy against the forward-pass budget (every method capped alike: one x-grid; with token
    budgets, the mean forward passes measured), against mean tokens and against mean wall time, one line
    per configuration (per database: solid, then dashed), 95% intervals, n in the legend."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        raise EvalError(f"The eval report needs matplotlib; {INSTALL_HINT}.") from None
    figure = Figure(figsize=(15, 5.4), dpi=100)
    passes, tokens, wall = figure.subplots(1, 3)
    forwards = all(by_forwards(s) for s in sources)
    line = 0
    budget_x: dict[int, list[float]] = defaultdict(list)
    for source in sources:
        by_config: dict[str, list[Point]] = defaultdict(list)
        for point in source.points():
            by_config[point.config.key].append(point)
        for points in by_config.values():
            colour, style, marker = line_style(line)
            line += 1
            label = points[0].config.label + (f" [{source.name}]" if len(sources) > 1 else "")
            accuracy = [100 * p.accuracy for p in points]
            error = [
                [100 * (p.accuracy - p.interval[0]) for p in points],
                [100 * (p.interval[1] - p.accuracy) for p in points],
            ]
            label += f" (n={points[-1].problems})"
            first_x = [float(p.budget) if forwards else p.forward_passes for p in points]
            for axis, xs in (
                (passes, first_x),
                (tokens, [p.tokens for p in points]),
                (wall, [p.wall_s for p in points]),
            ):
                axis.errorbar(
                    xs, accuracy, yerr=error, color=colour, linestyle=style, marker=marker,
                    markersize=4, capsize=2, label=label if axis is passes else None,
                )  # fmt: skip
            for p, x in zip(points, first_x, strict=True):
                budget_x[p.budget].append(x)
    for budget, xs in sorted(budget_x.items()):  # each budget labelled once, above the plot
        x = sorted(xs)[len(xs) // 2]
        passes.axvline(x, color="#bbbbbb", linestyle=":", linewidth=0.8, zorder=0)
        passes.annotate(
            str(budget), (x, 1.0), xycoords=("data", "axes fraction"), textcoords="offset points",
            xytext=(0, 2), ha="center", va="bottom", fontsize=7, color="#555555",
        )  # fmt: skip
    first_label = "forward-pass budget per problem (cap)" if forwards else "forward passes per problem (mean)"
    for axis, what in (
        (passes, first_label),
        (tokens, "tokens generated per problem (mean, all workers)"),
        (wall, "wall time per problem (s, mean)"),
    ):
        axis.set_xlabel(what)
        axis.set_ylabel("accuracy (%)")
        axis.set_ylim(-3, 103)
        axis.grid(True, alpha=0.3)
        if all(x > 0 for line in axis.get_lines() for x in line.get_xdata()):
            axis.set_xscale("log", base=2)
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
    first = sources[0].meta
    unit = "forward passes" if forwards else "tokens per worker"
    title = f"{first.get('dataset', '')} \u00b7 {first.get('model', '')}"
    title += f" (budgets in {unit}, above the left plot)"
    figure.suptitle(textwrap.fill(title, 150), fontsize=10)
    handles, labels = passes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    rows = (len(labels) + 2) // 3
    figure.tight_layout(rect=(0, min(0.5, 0.05 + 0.045 * rows), 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def line_style(index: int) -> tuple[str, str, str]:
    """The colour, line style and marker of the plot's `index`-th line (distinct for 140 lines)."""
    return COLOURS[index % len(COLOURS)], LINE_STYLES[index % len(LINE_STYLES)], MARKERS[index % len(MARKERS)]


def dataset_difference(sources: Sequence[Source]) -> str | None:
    """A warning when compared databases hold other datasets or other problems, else None."""
    first = sources[0]
    ids = [p.id for p in first.problems]
    for other in sources[1:]:
        if other.meta.get("dataset") != first.meta.get("dataset"):
            return (
                f"the databases hold different datasets ({first.name}: {first.meta.get('dataset')!r}, "
                f"{other.name}: {other.meta.get('dataset')!r}); their accuracies are not comparable"
            )
        if [p.id for p in other.problems] != ids:
            return f"{first.name} and {other.name} hold different problems of {first.meta.get('dataset')!r}"
    return None


# ---- the page ---------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #2ca02c; font-weight: 600; } .bad { color: #d62728; }
.question { max-width: 28rem; } .meta { color: #666; font-size: 0.9rem; }
img.plot { max-width: 100%; border: 1px solid #ddd; }
.better { background: #eef6ee; } .worse { background: #fbeeee; }
"""


def write_report(
    databases: Sequence[str | Path], out_dir: str | Path, names: Sequence[str] | None = None
) -> Path:
    """Write `report.html`, `accuracy.png` and the transcripts of one database (or several, compared)
    into `out_dir`; returns the page's path. Databases of different datasets or problems are compared
    with a warning (`warnings.warn`, and on the page)."""
    if not databases:
        raise EvalError("A report takes one results database, or several to compare.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = [Source.read(db, name) for db, name in zip(databases, names or _names(databases), strict=True)]
    try:
        if not any(s.rows for s in sources):
            raise EvalError(f"{databases[0]} has no result rows yet; run the eval first.")
        difference = dataset_difference(sources) if len(sources) > 1 else None
        if difference:
            warnings.warn(difference, stacklevel=2)
        png = plot_png(sources)
        (out / PLOT_NAME).write_bytes(png)
        sections = [
            _problem_table(s, out, tag if len(sources) > 1 else "")
            for s, tag in zip(sources, _tags(len(sources)), strict=True)
        ]
        page = _page(sources, png, sections, difference)
    finally:
        for source in sources:
            source.store.close()
    path = out / PAGE_NAME
    path.write_text(page, encoding="utf-8")
    return path


def _tags(n: int) -> list[str]:
    """The transcripts' folder per database: a, b, ... (db1, db2, ... beyond 26)."""
    return list("abcdefghijklmnopqrstuvwxyz"[:n]) if n <= 26 else [f"db{i + 1}" for i in range(n)]


def _names(databases: Sequence[str | Path]) -> list[str]:
    """How the report names each database: its file name, its folder and file when those clash."""
    paths = [Path(db).resolve() for db in databases]
    for naming in (lambda p: p.stem, lambda p: f"{p.parent.name}/{p.stem}"):
        names = [naming(p) for p in paths]
        if len(set(names)) == len(names):
            return names
    return [f"{i + 1}:{p.stem}" for i, p in enumerate(paths)]


def _budget_note(sources: Sequence[Source]) -> str:
    if all(by_forwards(s) for s in sources):
        return (
            "Each budget caps the forward passes of every run of every method alike; near the cap the "
            "workers stop and the finisher asks for the answer inside it."
        )
    return "Each budget caps the tokens every worker writes; then the finisher asks for the answer."


def _page(sources: Sequence[Source], png: bytes, sections: Sequence[str], difference: str | None) -> str:
    esc = html.escape
    compare = len(sources) > 1
    title = "Hogwild eval: " + " vs ".join(esc(s.name) for s in sources)
    image = base64.b64encode(png).decode("ascii")
    summary = _comparison_table(sources) if compare else _summary_table(sources[0])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
{f'<p class="bad">Warning: {esc(difference)}.</p>' if difference else ""}
{_settings_table(sources)}
<h2>Accuracy against forward passes, tokens and wall time</h2>
<img class="plot" alt="accuracy against forward passes, tokens and wall time"
 src="data:image/png;base64,{image}">
<p class="meta">Forward passes: a run's forwards after its prompt (steps, chunked writes, re-prefills and
the finisher's answer, the prefill not); a vote counts its longest sample, for forward passes and wall
time alike (its samples run side by side), and the tokens of all samples. Wall time: each run's own start
to end. Error bars: Wilson 95% intervals over the n (problem, seed) rows of each point.
{_budget_note(sources)}</p>
<h2>Accuracy per configuration and budget</h2>
{summary}
{"".join(_significance_table(s) for s in sources)}
{"".join(sections)}
</body></html>
"""


def _settings_table(sources: Sequence[Source]) -> str:
    esc = html.escape
    keys = list(dict.fromkeys(k for s in sources for k in s.meta if k != "schema"))
    head = "".join(f"<th>{esc(s.name)}</th>" for s in sources)
    body = "".join(
        f"<tr><th>{esc(k)}</th>" + "".join(f"<td>{esc(s.meta.get(k, ''))}</td>" for s in sources) + "</tr>"
        for k in keys
    )
    counts = "".join(f"<td>{len(s.problems)} problems, {len(s.rows)} rows</td>" for s in sources)
    return f"<table><tr><th></th>{head}</tr>{body}<tr><th>size</th>{counts}</tr></table>"


def _summary_table(source: Source) -> str:
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(p.config.label)}</td><td class=num>{p.budget}</td><td class=num>{p.problems}</td>"
        f"<td class=num>{100 * p.accuracy:.1f}%</td>"
        f"<td class=num>{100 * p.interval[0]:.1f}&ndash;{100 * p.interval[1]:.1f}%</td>"
        f"<td class=num>{p.score:.3f}</td><td class=num>{p.seeds}</td>"
        f"<td class=num>{p.forward_passes:.1f}</td><td class=num>{p.tokens:.1f}</td>"
        f"<td class=num>{p.wall_s:.2f}</td><td class=num>{p.per_correct(p.tokens):.0f}</td>"
        f"<td class=num>{p.per_correct(p.forward_passes):.0f}</td>"
        f"<td class=num>{p.per_correct(p.wall_s):.2f}</td></tr>"
        for p in source.points()
    )
    return (
        "<table><tr><th>configuration</th><th>budget</th><th>n</th><th>accuracy</th>"
        "<th>Wilson 95%</th><th>mean score</th><th>seeds</th><th>forward passes</th><th>tokens</th>"
        "<th>wall s</th><th>tokens per correct</th><th>forward passes per correct</th>"
        f"<th>wall s per correct</th></tr>{rows}</table>"
    )


def _significance_table(source: Source) -> str:
    """The paired tests of the source's configurations, significant differences (p < 0.05) first."""
    esc = html.escape
    labels = {c.key: c.label for c in source.configs}
    tests = sorted(paired_tests(source.rows, source.configs), key=lambda t: (not t.significant, t.p))
    if not tests:
        return ""
    significant = [t for t in tests if t.significant]
    if significant:
        said = "; ".join(
            f"{esc(labels[t.a] if t.a_only > t.b_only else labels[t.b])} beats "
            f"{esc(labels[t.b] if t.a_only > t.b_only else labels[t.a])} at budget {t.budget} (p = {t.p:.3g})"
            for t in significant
        )
        verdict = f"<p>Significant differences (p &lt; 0.05): {said}.</p>"
    else:
        verdict = "<p>No difference between configurations is significant (p &lt; 0.05).</p>"
    rows = "".join(
        f"<tr{' class=better' if t.significant else ''}><td>{esc(labels[t.a])}</td>"
        f"<td>{esc(labels[t.b])}</td>"
        f"<td class=num>{t.budget}</td><td class=num>{t.pairs}</td><td class=num>{t.a_correct}</td>"
        f"<td class=num>{t.b_correct}</td><td class=num>{t.a_only}</td><td class=num>{t.b_only}</td>"
        f"<td class=num>{t.p:.3g}</td><td>{'yes' if t.significant else 'no'}</td></tr>"
        for t in tests
    )
    heading = f"Paired tests ({esc(source.name)})"
    return (
        f"<h2>{heading}</h2><p class=meta>Exact McNemar tests on the (problem, seed) pairs both "
        f"configurations have, at the same budget.</p>{verdict}"
        "<table><tr><th>A</th><th>B</th><th>budget</th><th>pairs</th><th>A correct</th><th>B correct</th>"
        "<th>only A</th><th>only B</th><th>p</th><th>p &lt; 0.05</th></tr>"
        f"{rows}</table>"
    )


def _comparison_table(sources: Sequence[Source]) -> str:
    """Every database's accuracy per configuration (matched by name) and budget, with the change of
    each one against the first."""
    esc = html.escape
    tables = [{(p.config.name, p.budget): p for p in s.points()} for s in sources]
    labels = {c.name: c.label for s in sources for c in s.configs}  # compared by name across databases
    keys = list(dict.fromkeys(key for table in tables for key in table))
    rows = []
    for key in keys:
        first = tables[0].get(key)
        cells = []
        for i, table in enumerate(tables):
            p = table.get(key)
            cells.append(
                "<td class=num>-</td>" * 3
                if p is None
                else f"<td class=num>{100 * p.accuracy:.1f}%</td><td class=num>{p.problems}</td>"
                f"<td class=num>{p.forward_passes:.1f}</td>"
            )
            if i:
                delta, css = "-", ""
                if p is not None and first is not None:
                    change = 100 * (p.accuracy - first.accuracy)
                    delta = f"{change:+.1f}"
                    css = " better" if change > 0 else " worse" if change < 0 else ""
                cells.append(f'<td class="num{css}">{delta}</td>')
        rows.append(f"<tr><td>{esc(labels[key[0]])}</td><td class=num>{key[1]}</td>{''.join(cells)}</tr>")
    heads = "".join(f"<th colspan={3 if i == 0 else 4}>{esc(s.name)}</th>" for i, s in enumerate(sources))
    sub = "".join(
        "<th>accuracy</th><th>problems</th><th>forward passes</th>"
        + ("" if i == 0 else "<th>&Delta; accuracy (points)</th>")
        for i in range(len(sources))
    )
    return (
        "<table><tr><th rowspan=2>configuration</th><th rowspan=2>budget</th>"
        f"{heads}</tr><tr>{sub}</tr>{''.join(rows)}</table>"
    )


def _problem_table(source: Source, out: Path, tag: str) -> str:
    """Each problem's answer per configuration and budget, linked to its runs' transcripts (written
    under out/transcripts)."""
    esc = html.escape
    rows = {(r.problem, r.config, r.budget, r.seed): r for r in source.rows}
    seeds = sorted({r.seed for r in source.rows})
    columns = [
        (c, b, seed)
        for c in source.configs
        for b in sorted({r.budget for r in source.rows if r.config == c.key})
        for seed in seeds
    ]
    header = "".join(
        f"<th>{esc(c.label)}<br>budget {b}{f' seed {seed}' if len(seeds) > 1 else ''}</th>"
        for c, b, seed in columns
    )
    lines = []
    for problem in source.problems:
        cells = []
        for config, budget, seed in columns:
            row = rows.get((problem.id, config.key, budget, seed))
            if row is None:
                cells.append("<td></td>")
                continue
            links = [
                f'<a href="{_transcript(source, out, tag, problem.id, spec)}">'
                f"{'transcript' if len(row.samples) == 1 else f's{spec.sample + 1}'}</a>"
                for spec in config.runs(budget, seed)
            ]
            mark = '<span class="ok">&#10003;</span>' if row.correct else '<span class="bad">&#10007;</span>'
            answer = esc(_short(str(row.answer), 40)) if row.answer is not None else "<i>none</i>"
            cells.append(f"<td>{mark} {answer}<br>{' '.join(links)}</td>")
        question = (
            f'<td class=question title="{esc(problem.question)}">{esc(_short(problem.question, 160))}</td>'
        )
        lines.append(
            f"<tr><td>{esc(problem.id)}</td>{question}<td>{esc(problem.answer)}</td>{''.join(cells)}</tr>"
        )
    heading = f"Problems ({esc(source.name)})" if tag else "Problems"
    return (
        f"<h2>{heading}</h2><table><tr><th>id</th><th>question</th><th>reference</th>{header}</tr>"
        f"{''.join(lines)}</table>"
    )


def _transcript(source: Source, out: Path, tag: str, problem: str, spec: RunSpec) -> str:
    """Write the run's transcript page and return its link, relative to the report."""
    name = (
        f"{spec.protocol}-{spec.protocol_hash[:8]}-{spec.n_workers}w-{spec.layout}-b{spec.budget}"
        f"-r{spec.seed}-s{spec.sample}"
    )
    parts = ["transcripts", *([tag] if tag else []), _slug(problem), _slug(name) + ".html"]
    path = out.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source.store.transcript(problem, spec), encoding="utf-8")
    return "/".join(quote(part) for part in parts)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "_"


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
