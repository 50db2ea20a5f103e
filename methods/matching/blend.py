"""Representation blending (RepBlend, docs/methods.md#repblend): one mixing matrix per inner step.

For a batch of b pairs, λ ~ Beta(α_b, α_b) and a uniform permutation π give M = λI + (1−λ)P with P_{jk} = [k = π(j)].
The same M mixes the frozen-encoder features U and the synthetic text features T of the batch, so blended image j
stays paired with blended text j; the target similarity S_B is not mixed. Both passes of an iteration replay the
stored (λ, π).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Blend:
    """The mixing of one inner step: ``lam`` and the partner ``perm[j]`` of every row j."""

    lam: float
    perm: torch.Tensor

    @property
    def is_identity(self) -> bool:
        """M = I exactly (λ = 1 or π = identity)."""
        return self.lam == 1.0 or torch.equal(self.perm, torch.arange(self.perm.numel(), device=self.perm.device))

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """M v = λ v + (1−λ) v[π]; v itself when M = I, so the step (and its gradient) is then bit for bit the one
        without blending."""
        if self.is_identity:
            return v
        return self.lam * v + (1.0 - self.lam) * v[self.perm.to(v.device)]

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """M as a dense b×b matrix (tests, diagnostics)."""
        b = self.perm.numel()
        p = torch.zeros(b, b, dtype=dtype)
        p[torch.arange(b), self.perm.cpu()] = 1.0
        return self.lam * torch.eye(b, dtype=dtype) + (1.0 - self.lam) * p


def draw_blend(gen: torch.Generator, batch: int, alpha: float) -> Blend:
    """(λ, π) for one step from the phase generator: π by ``randperm``, λ from a Beta(α, α) stream seeded by the
    generator (torch's Beta sampler takes no generator; numpy's seeded one keeps the draw reproducible and resumable)."""
    perm = torch.randperm(batch, generator=gen)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return Blend(lam, perm)
