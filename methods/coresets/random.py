"""``random``: ``budget`` training pairs drawn uniformly without replacement (seeded)."""

from __future__ import annotations

import torch

from benchmark.interface import DistillTask
from benchmark.seeding import derive_seed
from methods.coresets.common import CoresetMethod


class RandomCoreset(CoresetMethod):
    """`budget` training pairs drawn uniformly without replacement (seeded)."""

    name = "random"

    def select(self, task: DistillTask) -> torch.Tensor:
        gen = torch.Generator().manual_seed(derive_seed(task.seed, "random-coreset"))
        return torch.randperm(task.train.n_pairs, generator=gen)[: task.budget]
