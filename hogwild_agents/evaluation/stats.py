"""Statistics of an eval: Wilson intervals for accuracies and exact McNemar tests between configurations.

Rows of several replicate seeds are pooled: a configuration's accuracy at a budget is over every
(problem, seed) row it has, and two configurations are paired on the (problem, seed) rows they share.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

Z95 = 1.959963984540054  # the two-sided 95% normal quantile
ALPHA = 0.05


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of `correct` successes in `n` trials (95% by default).

    Unlike the normal approximation it has non-zero width at 0/n and n/n."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(b: int, c: int) -> float:
    """The two-sided exact McNemar p-value of `b` and `c` discordant pairs (a binomial test of
    min(b, c) successes in b + c trials with p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Two configurations at one budget on the rows they share: `a_only` rows only A got right,
    `b_only` only B; `p` the exact McNemar p-value."""

    a: str
    b: str
    budget: int
    pairs: int
    a_correct: int
    b_correct: int
    a_only: int
    b_only: int
    p: float

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


def paired_test(
    a: str, b: str, budget: int, a_rows: Mapping[tuple, bool], b_rows: Mapping[tuple, bool]
) -> Paired:
    """The McNemar test of A against B over the keys (problem, seed) both have."""
    shared = [key for key in a_rows if key in b_rows]
    a_only = sum(1 for key in shared if a_rows[key] and not b_rows[key])
    b_only = sum(1 for key in shared if b_rows[key] and not a_rows[key])
    return Paired(
        a,
        b,
        budget,
        len(shared),
        sum(a_rows[key] for key in shared),
        sum(b_rows[key] for key in shared),
        a_only,
        b_only,
        mcnemar_exact(a_only, b_only),
    )
