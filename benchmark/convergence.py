"""When has a distillation converged? The criterion the default preset is sized by, and the report checks.

Within each phase, the normalised matching loss (``match_loss`` in ``distill_log.jsonl``) is averaged over the last
quarter of the phase's iterations and over the quarter before it. The phase has **flattened** when the relative
decrease between the two, ``(prev − last) / prev``, is below ``TOLERANCE`` (5 %): another quarter of the run would
buy less than that. A run has converged when every phase has. Runs without a matching loss (coresets) are not judged.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

TOLERANCE = 0.05


@dataclass(frozen=True)
class PhaseTrend:
    phase: int
    iterations: int
    prev: float  # mean loss over the second-to-last quarter
    last: float  # mean loss over the last quarter

    @property
    def decrease(self) -> float:
        """Relative decrease of the quarter means (negative: the loss rose)."""
        return (self.prev - self.last) / self.prev if self.prev else 0.0

    @property
    def flat(self) -> bool:
        return self.decrease < TOLERANCE


def phase_trends(history: list[dict[str, Any]], key: str = "match_loss") -> list[PhaseTrend]:
    """One :class:`PhaseTrend` per phase of a distillation log (phases with fewer than 8 entries are skipped)."""
    phases: dict[int, list[float]] = {}
    for rec in history:
        if key in rec:
            phases.setdefault(int(rec.get("phase", 0)), []).append(float(rec[key]))
    out = []
    for k, losses in sorted(phases.items()):
        q = len(losses) // 4
        if q < 2:
            continue
        out.append(PhaseTrend(k, len(losses), statistics.fmean(losses[-2 * q:-q]), statistics.fmean(losses[-q:])))
    return out


def converged(history: list[dict[str, Any]]) -> bool | None:
    """True when every phase has flattened; None when the log has no matching loss to judge."""
    trends = phase_trends(history)
    return all(t.flat for t in trends) if trends else None
