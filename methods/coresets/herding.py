"""``herding``: greedy herding (Welling, 2009) on joint pair features.

Features: :func:`methods.coresets.common.pair_features` under expert ``seed mod n_experts`` (so seeds differ by the
feature model). Step k picks the unselected pair j minimising ‖μ − (Σ_selected f + f_j) / k‖, μ the mean feature;
ties go to the lowest index. The selection is deterministic given the features.
"""

from __future__ import annotations

import torch

from benchmark.interface import DistillTask
from methods.coresets.common import CoresetMethod, pair_features


def herding_select(features: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` rows of ``features`` chosen by greedy herding.

    ‖μ − (A + f_j)/k‖² = ‖w − f_j‖²/k² with w = kμ − A, so each step is one matrix-vector product:
    argmin_j ‖f_j‖² − 2 f_j·w.
    """
    f = features.double()
    mu = f.mean(0)
    sq = (f * f).sum(1)
    chosen = torch.zeros(len(f), dtype=torch.bool)
    acc = torch.zeros_like(mu)
    out = []
    for step in range(1, k + 1):
        dist = sq - 2 * (f @ (step * mu - acc))
        dist[chosen] = float("inf")
        j = int(torch.argmin(dist))
        out.append(j)
        chosen[j] = True
        acc += f[j]
    return torch.tensor(out, dtype=torch.long)


class HerdingCoreset(CoresetMethod):
    """Herding: greedily match the mean of the experts' joint pair embeddings."""

    name = "herding"
    uses_experts = True

    def select(self, task: DistillTask) -> torch.Tensor:
        return herding_select(pair_features(task, task.seed).cpu(), task.budget)
