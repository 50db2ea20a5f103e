"""``forgetting``: the pairs forgotten most often while the experts trained (Toneva et al., 2019, for pairs).

A pair is *learned* after a step when, within its mini-batch, its image ranks its own caption first and its caption
ranks its image first; a *forgetting event* is a learned -> not-learned transition between consecutive
presentations (counted in :mod:`benchmark.experts.train`). Score = forgetting events summed over all experts;
pairs never learned by any expert rank above every forgotten pair (infinitely forgettable, as in Toneva et al.).
The ``budget`` highest scores are kept; ties are broken by a seeded random order.
"""

from __future__ import annotations

import torch

from benchmark.interface import DistillTask
from benchmark.seeding import derive_seed
from methods.coresets.common import CoresetMethod


def forgetting_select(events: torch.Tensor, ever_learned: torch.Tensor, k: int, generator: torch.Generator
                      ) -> torch.Tensor:
    """Top-``k`` pairs by forgetting score; never-learned pairs first; seeded random tie-breaking."""
    score = events.double().clone()
    score[~ever_learned.bool()] = float("inf")
    perm = torch.randperm(len(score), generator=generator)
    order = torch.argsort(score[perm], descending=True, stable=True)
    return perm[order[:k]]


class ForgettingCoreset(CoresetMethod):
    """Forgetting: the pairs forgotten most often while an expert trains."""

    name = "forgetting"
    uses_experts = True

    def select(self, task: DistillTask) -> torch.Tensor:
        experts = task.require_experts(self.name)
        events = sum(e.stat("forget_count").long() for e in experts)
        ever = torch.stack([e.stat("ever_learned").bool() for e in experts]).any(0)
        if len(events) != task.train.n_pairs:
            raise ValueError(f"expert statistics cover {len(events)} pairs, the training split has "
                             f"{task.train.n_pairs}: rerun `mmdd experts`")
        gen = torch.Generator().manual_seed(derive_seed(task.seed, "forgetting-ties"))
        return forgetting_select(events, ever, task.budget, gen)
