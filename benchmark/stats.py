"""Statistics of the report: intervals over seeds, paired comparisons, a tie-aware ranking.

The unit of replication is the **distillation seed**: a cell's value is the mean over its evaluation students, and
each seed gives one value. With the 3-5 seeds a grid affords, a percentile bootstrap is unreliable (with n = 5 it can
only resample 126 distinct multisets, and its intervals are known to undercover badly for n < 10), so every interval
here is a **Student-t interval** (``scipy.stats.t``), which is exact when the seed values are normal and the standard
small-sample choice otherwise:

* interval of one method: ``mean ± t_{0.975, n-1} · s / √n`` (s the sample std, n − 1 in the denominator);
* comparison of two methods, ``a − b``:
  - **paired** (the default: both ran the same seeds, so seed-level noise shared by the two cancels): the t interval
    of the per-seed differences and ``scipy.stats.ttest_rel``'s two-sided p-value, n = the number of matched seeds;
  - **Welch** (the fallback when the two seed sets differ): ``scipy.stats.ttest_ind(equal_var=False)``, the
    Welch-Satterthwaite interval of the difference of means; n = the seeds of ``a`` plus those of ``b``.
  A comparison whose differences (paired) or both samples (Welch) have no spread beyond float rounding is decided
  exactly: p = 1 when the difference is 0, else p = 0, and the interval is the point. With fewer than two values
  on a side nothing can be tested: the interval is NaN and p = 1 (no evidence of a difference).

**Ranking rule.** Methods are sorted by mean (higher is better; equal means by name). The first method leads the
first tie group. Going down the list, a method joins the current group when its comparison with the group's
**leader** (the best method of the group) is not significant at α = 0.05 (p ≥ α); otherwise it starts a new group
and leads it. Every member of a group is therefore statistically indistinguishable from the group's best, and a
group never chains through intermediate methods. All members share the rank of their leader's position
(competition ranking: 1, 1, 3, ...). p-values are not adjusted for multiple comparisons; the tables say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
from scipy import stats as sps

ALPHA = 0.05
CONFIDENCE = 0.95
PAIRED = "paired t"
WELCH = "Welch t"


@dataclass(frozen=True)
class Interval:
    """A mean with its interval; ``kind`` says what the interval is (e.g. a 95 % t interval over seeds)."""

    mean: float
    lo: float
    hi: float
    n: int
    kind: str

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class Comparison:
    """``a`` − ``b``: the mean difference, its 95 % interval, the two-sided p-value and which test gave them."""

    a: str
    b: str
    diff: float
    lo: float
    hi: float
    p: float
    n: int
    test: str

    @property
    def significant(self) -> bool:
        return self.p < ALPHA


@dataclass(frozen=True)
class Ranked:
    """One method's place: ``rank`` (competition rank of its tie group), ``group`` (1-based tie group), ``leader``
    (the group's best method) and the comparison with the leader (None for the leader itself)."""

    method: str
    mean: float
    rank: int
    group: int
    leader: str
    vs_leader: Comparison | None


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """The Student-t interval of the mean of ``values``; NaN bounds for a single value (no spread to estimate)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, math.nan, math.nan, 1, "single value")
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = float(sps.t.ppf((1 + confidence) / 2, x.size - 1)) * sem
    return Interval(mean, mean - half, mean + half, int(x.size), f"{confidence:.0%} t over {x.size}")


def spread_interval(mean: float, std: float, n: int, what: str) -> Interval:
    """``mean ± std`` labelled with what the std is over (e.g. evaluation students of a single run)."""
    return Interval(mean, mean - std, mean + std, n, f"± std over {what}")


def compare(a: Mapping[int, float], b: Mapping[int, float], name_a: str = "a", name_b: str = "b") -> Comparison:
    """``a − b`` over seeds: paired when both have the same seeds, Welch otherwise (module docstring)."""
    if set(a) == set(b) and len(a) >= 2:
        seeds = sorted(a)
        return _paired(np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds]), name_a, name_b)
    return _welch(np.array(list(a.values()), float), np.array(list(b.values()), float), name_a, name_b)


def _constant(x: np.ndarray) -> bool:
    """All values equal up to float rounding (a t statistic of rounding noise would be meaningless)."""
    return float(np.ptp(x)) <= 1e-9 * max(1.0, float(np.abs(x).max()))


def _exact(diff: float, scale: float, n: int, test: str, name_a: str, name_b: str) -> Comparison:
    zero = abs(diff) <= 1e-9 * max(1.0, scale)
    return Comparison(name_a, name_b, diff, diff, diff, 1.0 if zero else 0.0, n, test)


def _untestable(diff: float, n: int, test: str, name_a: str, name_b: str) -> Comparison:
    return Comparison(name_a, name_b, diff, math.nan, math.nan, 1.0, n, test)


def _paired(x: np.ndarray, y: np.ndarray, name_a: str, name_b: str) -> Comparison:
    d = x - y
    diff = float(d.mean())
    if _constant(d):
        return _exact(diff, float(np.abs(np.r_[x, y]).max()), d.size, PAIRED, name_a, name_b)
    res = sps.ttest_rel(x, y)
    ci = res.confidence_interval(CONFIDENCE)
    return Comparison(name_a, name_b, diff, float(ci.low), float(ci.high), float(res.pvalue), d.size, PAIRED)


def _welch(x: np.ndarray, y: np.ndarray, name_a: str, name_b: str) -> Comparison:
    if x.size == 0 or y.size == 0:
        raise ValueError(f"compare({name_a}, {name_b}): each side needs at least one value")
    diff = float(x.mean() - y.mean())
    n = int(x.size + y.size)
    if x.size < 2 or y.size < 2:
        return _untestable(diff, n, WELCH, name_a, name_b)
    if _constant(x) and _constant(y):
        return _exact(diff, float(np.abs(np.r_[x, y]).max()), n, WELCH, name_a, name_b)
    res = sps.ttest_ind(x, y, equal_var=False)
    ci = res.confidence_interval(CONFIDENCE)
    return Comparison(name_a, name_b, diff, float(ci.low), float(ci.high), float(res.pvalue), n, WELCH)


def rank(values: Mapping[str, Mapping[int, float]], alpha: float = ALPHA) -> list[Ranked]:
    """Rank methods (``method -> seed -> value``, higher is better) into tie groups by the leader rule."""
    means = {m: float(np.mean(list(v.values()))) for m, v in values.items() if len(v)}
    order = sorted(means, key=lambda m: (-means[m], m))
    out: list[Ranked] = []
    leader, group, group_rank = "", 0, 0
    for pos, m in enumerate(order, start=1):
        vs = compare(values[leader], values[m], leader, m) if leader else None
        if vs is None or vs.p < alpha:
            leader, group, group_rank, vs = m, group + 1, pos, None
        out.append(Ranked(m, means[m], group_rank, group, leader, vs))
    return out
