"""The configurations an eval compares, and the runs each one needs.

Methods (paper, section 4):
- `hogwild`: N workers over one shared cache, with a protocol and a layout (contiguous or combined).
- `msgpass`: message passing: N workers that see each other only at step ends (the `interleaved`
  layout: finished steps join a shared history, others' steps in progress stay invisible).
- `single`: one worker.
- `vote`: self-consistency: N independent one-worker runs (seeds seed, seed+1, ...), majority vote.

The baselines (`single`, `vote`, `msgpass`) use one protocol, the baseline protocol (default: the first
one given). A run is identified by its `RunSpec`, so configurations that need the same run share it:
a vote of 4 reuses the vote of 2's samples and the single run (its seed-0 sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hogwild_agents.errors import EvalError
from hogwild_agents.views import LAYOUTS

METHODS = ("single", "hogwild", "msgpass", "vote")
BASELINES = ("single", "vote", "msgpass")
MESSAGE_PASSING_LAYOUT = "interleaved"


@dataclass(frozen=True)
class RunSpec:
    """One engine run of one problem: what `engine.generate` is given besides the prompt."""

    protocol: str
    n_workers: int
    layout: str
    budget: int  # max_new_tokens: each worker writes at most this many tokens
    seed_offset: int  # added to the eval's seed


@dataclass(frozen=True)
class Config:
    """One line of the plot: a method with its worker count, protocol and layout."""

    method: str
    workers: int
    protocol: str
    layout: str = "combined"

    @property
    def name(self) -> str:
        """The stable key of the configuration in the results database."""
        if self.method == "single":
            return f"single/{self.protocol}"
        if self.method == "hogwild":
            return f"hogwild-{self.layout}-x{self.workers}/{self.protocol}"
        return f"{self.method}-x{self.workers}/{self.protocol}"

    @property
    def label(self) -> str:
        """How plots and tables name it."""
        head = {
            "single": "1 worker",
            "hogwild": f"Hogwild {self.layout} \u00d7{self.workers}",
            "msgpass": f"Message passing \u00d7{self.workers}",
            "vote": f"Vote of {self.workers}",
        }[self.method]
        return f"{head} \u00b7 {self.protocol}"

    def runs(self, budget: int) -> list[RunSpec]:
        """The runs one problem needs at `budget`; a vote has one run per sample."""
        if self.method == "vote":
            return [RunSpec(self.protocol, 1, "combined", budget, k) for k in range(self.workers)]
        n_workers = 1 if self.method == "single" else self.workers
        layout = "combined" if self.method == "single" else self.layout
        return [RunSpec(self.protocol, n_workers, layout, budget, 0)]


def build_grid(
    workers: Sequence[int],
    protocols: Sequence[str],
    layouts: Sequence[str],
    baselines: Sequence[str] = BASELINES,
    baseline_protocol: str | None = None,
) -> list[Config]:
    """Every configuration of the grid, baselines included, without duplicates, in plotting order.

    Each N > 1 in `workers` gives a hogwild configuration per protocol and layout (layout `interleaved`
    is message passing), plus the `vote` and `msgpass` baselines with N workers; N = 1 (or the `single`
    baseline) gives the one-worker configuration."""
    if not workers or any(not isinstance(n, int) or n < 1 for n in workers):
        raise EvalError(f"--workers must list positive worker counts, got {list(workers)}.")
    if not protocols:
        raise EvalError("--protocols must name at least one protocol.")
    unknown = [layout for layout in layouts if layout not in LAYOUTS]
    if unknown or not layouts:
        raise EvalError(f"--layouts must list some of {', '.join(LAYOUTS)}, got {list(layouts)}.")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise EvalError(f"Unknown baseline(s) {unknown}; choose from {', '.join(BASELINES)} (or none).")
    base = baseline_protocol or protocols[0]
    configs = []
    if 1 in workers or "single" in baselines:
        configs.append(Config("single", 1, base))
    for n in sorted(set(workers) - {1}):
        for protocol in protocols:
            for layout in layouts:
                if layout == MESSAGE_PASSING_LAYOUT:
                    configs.append(Config("msgpass", n, protocol, MESSAGE_PASSING_LAYOUT))
                else:
                    configs.append(Config("hogwild", n, protocol, layout))
        if "msgpass" in baselines:
            configs.append(Config("msgpass", n, base, MESSAGE_PASSING_LAYOUT))
        if "vote" in baselines:
            configs.append(Config("vote", n, base))
    return list(dict.fromkeys(configs))


def parse_list(text: str, what: str, kind: type = str) -> list:
    """A comma-separated option as a list ("1,2,4" -> [1, 2, 4]); "none" or "" is the empty list."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if [i.lower() for i in items] == ["none"]:
        return []
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise EvalError(
            f"--{what} must be a comma-separated list of {kind.__name__}s, got {text!r}."
        ) from None
