"""Learned target similarity of the synthetic pairs (docs/methods.md#learned-similarity), with per-batch indexing.

The engine never lets autograd see the full-size parameters: :meth:`Similarity.gather` returns batch-sized leaf
tensors, the inner loss is differentiated with respect to those, and :meth:`Similarity.scatter_` adds the batch
gradients back into full-size accumulators — rows ``B`` of ``a``, ``L``, ``R`` (low-rank) or the block ``[B, B]`` of
``S`` (full). Batches hold distinct indices; repeated indices across steps accumulate.

Parameter names match the :class:`benchmark.distilled.Phase` fields (``sim_full``, ``sim_a``, ``sim_l``, ``sim_r``).
"""

from __future__ import annotations

import torch

from methods.matching.config import SimilaritySpec


class Similarity:
    """Base class and the ``none`` kind (identity target, no parameters)."""

    kind = "none"

    def __init__(self, n: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.n = n
        self.alpha = 1.0
        self.tensors: dict[str, torch.Tensor] = {}

    # batch view ---------------------------------------------------------------------------------------------------
    def gather(self, idx: torch.Tensor, requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """Batch-indexed copies of the parameters (leaves; with ``requires_grad`` when asked)."""
        return {}

    def batch_matrix(self, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The target ``S_B`` (``[b, b]``) built from :meth:`gather`'s output; None for the identity."""
        return None

    def scatter_(self, grads: dict[str, torch.Tensor], idx: torch.Tensor, part_grads: dict[str, torch.Tensor]) -> None:
        """Accumulate batch gradients into full-size buffers ``grads`` (same keys as :attr:`tensors`)."""

    # full view ----------------------------------------------------------------------------------------------------
    def matrix(self, tensors: dict[str, torch.Tensor] | None = None) -> torch.Tensor | None:
        return None


class FullSimilarity(Similarity):
    """An ``n × n`` parameter initialised to the identity; a batch uses the block ``S[B, B]``."""

    kind = "full"

    def __init__(self, n: int, device="cpu", dtype=torch.float32):
        super().__init__(n, device, dtype)
        self.tensors = {"sim_full": torch.eye(n, device=device, dtype=dtype)}

    def gather(self, idx, requires_grad=False):
        block = self.tensors["sim_full"][idx.unsqueeze(1), idx.unsqueeze(0)]
        return {"sim_full": block.requires_grad_(requires_grad)}

    def batch_matrix(self, parts):
        return parts["sim_full"]

    def scatter_(self, grads, idx, part_grads):
        g = part_grads.get("sim_full")
        if g is not None:
            rows = idx.unsqueeze(1).expand(-1, idx.numel())
            cols = idx.unsqueeze(0).expand(idx.numel(), -1)
            grads["sim_full"].index_put_((rows, cols), g, accumulate=True)

    def matrix(self, tensors=None):
        return (tensors or self.tensors)["sim_full"]


class LowRankSimilarity(Similarity):
    """``S = diag(a) + (alpha / rank) · L Rᵀ`` with ``a = 1``, ``L ~ N(0, 1)``, ``R = 0`` at init (S = I).

    A batch uses ``S_B = diag(a_B) + (alpha / rank) · L_B R_Bᵀ`` from the rows ``B`` of each factor."""

    kind = "lowrank"

    def __init__(self, n: int, rank: int, alpha: float, generator: torch.Generator, device="cpu",
                 dtype=torch.float32):
        super().__init__(n, device, dtype)
        self.rank = int(rank)
        self.alpha = float(alpha)
        left = torch.randn(n, self.rank, generator=generator, dtype=torch.float64)
        self.tensors = {"sim_a": torch.ones(n, device=device, dtype=dtype),
                        "sim_l": left.to(device=device, dtype=dtype),
                        "sim_r": torch.zeros(n, self.rank, device=device, dtype=dtype)}

    def gather(self, idx, requires_grad=False):
        return {k: v[idx].requires_grad_(requires_grad) for k, v in self.tensors.items()}

    def batch_matrix(self, parts):
        return torch.diag(parts["sim_a"]) + (self.alpha / self.rank) * parts["sim_l"] @ parts["sim_r"].T

    def scatter_(self, grads, idx, part_grads):
        for k, g in part_grads.items():
            if g is not None:
                grads[k].index_add_(0, idx, g)

    def matrix(self, tensors=None):
        t = tensors or self.tensors
        return torch.diag(t["sim_a"]) + (self.alpha / self.rank) * t["sim_l"] @ t["sim_r"].T


def make_similarity(spec: SimilaritySpec, n: int, generator: torch.Generator, device="cpu",
                    dtype=torch.float32, rank: int | None = None) -> Similarity:
    """Build the similarity of ``spec`` for ``n`` pairs (``rank`` overrides ``spec.rank``, e.g. per PTM phase)."""
    if spec.kind == "none":
        return Similarity(n, device, dtype)
    if spec.kind == "full":
        return FullSimilarity(n, device, dtype)
    if spec.kind == "lowrank":
        return LowRankSimilarity(n, rank or spec.rank, spec.alpha, generator, device, dtype)
    raise ValueError(f"similarity kind {spec.kind!r} must be none, full or lowrank")
