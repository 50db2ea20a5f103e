"""Contrastive losses over a logit matrix ``Z = s·cos`` and an optional target similarity ``S`` (docs/methods.md#losses).

One implementation serves expert training, evaluation students and every distillation method. ``S=None`` means the
identity (each image matches its own caption).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

EPS = 1e-6


def _target(z: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    if s is None:
        return torch.eye(z.shape[0], z.shape[1], dtype=z.dtype, device=z.device)
    return s


def symmetric_ce(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """½[CE(Z, I) + CE(Zᵀ, I)]: the CLIP loss with diagonal targets (``S`` is ignored)."""
    labels = torch.arange(z.shape[0], device=z.device)
    return 0.5 * (F.cross_entropy(z, labels) + F.cross_entropy(z.T, labels))


def infonce(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """½[−mean_j Σ_k S_jk log softmax_k(Z_j·) + the same on Zᵀ, Sᵀ]; rows of S are not normalised."""
    t = _target(z, s)
    return 0.5 * (-(t * F.log_softmax(z, 1)).sum(1).mean() - (t.T * F.log_softmax(z.T, 1)).sum(1).mean())


def cwcl(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with each target row divided by its sum (+1e-6)."""
    t = _target(z, s)
    ti = t / (t.sum(1, keepdim=True) + EPS)
    tt = t.T / (t.T.sum(1, keepdim=True) + EPS)
    return 0.5 * (-(ti * F.log_softmax(z, 1)).sum(1).mean() - (tt * F.log_softmax(z.T, 1)).sum(1).mean())


def wbce(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """Balanced BCE: mean loss over positives (S > 0.5, mask without gradient) and over negatives, averaged."""
    t = _target(z, s)
    p = torch.sigmoid(z)
    ell = -t * torch.log(p + EPS) - (1 - t) * torch.log(1 - p + EPS)
    pos = (t > 0.5).detach().to(z.dtype)
    neg = 1 - pos
    return 0.5 * ((ell * pos).sum() / (pos.sum() + EPS) + (ell * neg).sum() / (neg.sum() + EPS))


def kl(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """½[KL(softmax(10·S) ‖ softmax(Z)) + the same transposed], element-mean reduction as ``KLDivLoss('mean')``."""
    t = _target(z, s)
    # reduction "sum" / numel is the element mean of KLDivLoss('mean') without its deprecation warning.
    a = F.kl_div(F.log_softmax(z, 1), F.softmax(10 * t, 1), reduction="sum") / z.numel()
    b = F.kl_div(F.log_softmax(z.T, 1), F.softmax(10 * t.T, 1), reduction="sum") / z.numel()
    return 0.5 * (a + b)


def bce(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE(σ(Z), S), computed from the logits for stability."""
    return F.binary_cross_entropy_with_logits(z, _target(z, s))


def mse(z: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between σ(Z) and S."""
    return F.mse_loss(torch.sigmoid(z), _target(z, s))


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]] = {
    "ce": symmetric_ce, "infonce": infonce, "cwcl": cwcl, "wbce": wbce, "kl": kl, "bce": bce, "mse": mse,
}


def get_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Look a loss up by name (``ce wbce infonce cwcl kl bce mse``)."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown loss {name!r}: choose one of {sorted(LOSSES)}") from None
