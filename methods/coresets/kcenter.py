"""``kcenter``: greedy k-center (farthest-point) selection on joint pair features.

Features as for herding (expert ``seed mod n_experts``). The first center is a seeded uniform draw; each next
center is the pair farthest (Euclidean) from its nearest chosen center; ties go to the lowest index.
"""

from __future__ import annotations

import torch

from benchmark.interface import DistillTask
from benchmark.registry import register_method
from benchmark.seeding import derive_seed
from methods.coresets.common import CoresetMethod, pair_features


def kcenter_select(features: torch.Tensor, k: int, first: int) -> torch.Tensor:
    """Indices of ``k`` rows chosen by greedy farthest-point traversal starting at row ``first``."""
    f = features.double()
    out = [first]
    mind = torch.cdist(f, f[first:first + 1]).squeeze(1)
    for _ in range(k - 1):
        j = int(torch.argmax(mind))
        out.append(j)
        mind = torch.minimum(mind, torch.cdist(f, f[j:j + 1]).squeeze(1))
    return torch.tensor(out, dtype=torch.long)


@register_method("kcenter")
class KCenterCoreset(CoresetMethod):
    needs_experts = True

    def select(self, task: DistillTask) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(task.seed, "kcenter-start"))
        first = int(torch.randint(task.train.n_pairs, (1,), generator=gen))
        return kcenter_select(pair_features(task, task.seed).cpu(), task.budget, first)
