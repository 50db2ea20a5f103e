"""``kcenter``: greedy k-center (farthest-point) selection on joint pair features.

Features as for herding (expert ``seed mod n_experts``). The first center is a seeded uniform draw; each next
center is the pair farthest (Euclidean) from its nearest chosen center; ties go to the lowest index.
"""

from __future__ import annotations

import torch

from benchmark.interface import DistillTask
from benchmark.seeding import derive_seed
from methods.coresets.common import CoresetMethod, pair_features


def kcenter_select(features: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Indices of ``k`` rows chosen by greedy farthest-point traversal starting at row ``first``."""
    f = features.double()
    sq = (f * f).sum(1)

    def dist2(j: int) -> torch.Tensor:  # squared distances to row j, one matrix-vector product
        return (sq - 2 * (f @ f[j]) + sq[j]).clamp_min(0)

    out = [first]
    mind = dist2(first)
    for _ in range(k - 1):
        j = int(torch.argmax(mind))
        out.append(j)
        mind = torch.minimum(mind, dist2(j))
    return torch.tensor(out, dtype=torch.long)


class KCenterCoreset(CoresetMethod):
    """k-center: farthest-point selection on the experts' joint pair embeddings."""

    name = "kcenter"
    uses_experts = True

    def select(self, task: DistillTask) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(task.seed, "kcenter-start"))
        first = int(torch.randint(task.train.n_pairs, (1,), generator=gen))
        return kcenter_select(pair_features(task, task.seed).cpu(), task.budget, first)
