"""The configurations an eval compares, and the runs each one needs.

Methods (paper, section 4):
- `hogwild`: N workers over one shared cache, with a protocol and a layout (contiguous or combined).
- `msgpass`: idealised message passing: N workers that see each other only at step ends, on the shared
  cache (the `interleaved` layout: finished steps join a shared history, others' steps in progress
  stay invisible); it re-encodes nothing, so it pays none of message passing's cost.
- `reprefill`: message passing as it runs without a shared cache: N agents, each its own sequence,
  every K tokens each re-prefilling what the others wrote (`evaluation.message_passing`).
- `single`: one worker.
- `vote`: self-consistency: N independent one-worker runs, majority vote.

The baselines (`single`, `vote`, `msgpass`, `reprefill`) use one protocol, the baseline protocol
(default: the first one given; `none`: the plain prompt, no collaboration text). A run is identified by
its `RunSpec`, so configurations that need the same run share it: a vote of 4 reuses the vote of 2's
samples and the single run (its sample 0). Configurations and runs are keyed by content: the protocol's
fingerprint (a hash of what its template renders and of its options, not of its path) is part of both
keys, so an edited template gives new runs. Every run's sampling seed is a hash of the replicate seed,
the run's spec, its vote sample and the problem (`run_seed`): no two runs share a random stream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hogwild_agents.errors import EvalError
from hogwild_agents.views import LAYOUTS

METHODS = ("single", "hogwild", "msgpass", "reprefill", "vote")
BASELINES = ("single", "vote", "msgpass", "reprefill")
MESSAGE_PASSING_LAYOUT = "interleaved"
REPREFILL_LAYOUT = "reprefill"  # a RunSpec layout: agents in their own sequences, re-prefilled every K
NO_PROTOCOL = "none"  # the plain prompt (the baseline protocol may be none)


@dataclass(frozen=True)
class RunSpec:
    """One engine run of one problem: what `engine.generate` is given besides the prompt."""

    protocol: str
    protocol_hash: str  # the protocol's content fingerprint ("" when unknown)
    n_workers: int
    layout: str
    budget: int  # the cap: forward passes of the run, or tokens each worker writes (the eval's unit)
    seed: int  # the replicate seed
    sample: int  # the vote sample (0 for every other method)

    def run_seed(self, problem: str, checkpointed: bool = False) -> int:
        """The sampling seed of this run of `problem`: a hash of everything that identifies the run, so
        replicates, vote samples and problems draw from independent streams. `checkpointed`: the budget
        left out (one run is read at every budget on its way)."""
        budget = "checkpointed" if checkpointed else self.budget
        key = json.dumps(
            [self.seed, self.protocol, self.protocol_hash, self.n_workers, self.layout, budget,
             self.sample, problem]
        )  # fmt: skip
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 2


@dataclass(frozen=True)
class Config:
    """One line of the plot: a method with its worker count, protocol and layout."""

    method: str
    workers: int
    protocol: Any  # a protocol name, template path or text, or a Protocol (the runner names it)
    layout: str = "combined"
    protocol_hash: str = ""  # the protocol's content fingerprint, set by the runner

    @property
    def key(self) -> str:
        """The configuration's key in the results database: its name and its protocol's fingerprint."""
        return f"{self.name}@{self.protocol_hash[:12]}" if self.protocol_hash else self.name

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
            "msgpass": f"Message passing, shared cache (idealised) \u00d7{self.workers}",
            "reprefill": f"Message passing, re-prefill \u00d7{self.workers}",
            "vote": f"Vote of {self.workers}",
        }[self.method]
        return f"{head} \u00b7 {self.protocol}"

    def runs(self, budget: int, seed: int = 0) -> list[RunSpec]:
        """The runs one problem needs at `budget` for replicate `seed`; a vote has one run per sample."""
        name, digest = str(self.protocol), self.protocol_hash
        if self.method == "vote":
            return [RunSpec(name, digest, 1, "combined", budget, seed, k) for k in range(self.workers)]
        n_workers = 1 if self.method == "single" else self.workers
        layout = {"single": "combined", "reprefill": REPREFILL_LAYOUT}.get(self.method, self.layout)
        return [RunSpec(name, digest, n_workers, layout, budget, seed, 0)]


def build_grid(
    workers: Sequence[int],
    protocols: Sequence[Any],
    layouts: Sequence[str],
    baselines: Sequence[str] = BASELINES,
    baseline_protocol: Any = None,
) -> list[Config]:
    """Every configuration of the grid, baselines included, without duplicates, in plotting order.

    Each N > 1 in `workers` gives a hogwild configuration per protocol and layout (layout `interleaved`
    is message passing), plus the `vote`, `msgpass` and `reprefill` baselines with N workers; N = 1 (or
    the `single` baseline) gives the one-worker configuration."""
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
    base = protocols[0] if baseline_protocol is None else baseline_protocol
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
        if "reprefill" in baselines:
            configs.append(Config("reprefill", n, base, REPREFILL_LAYOUT))
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
