"""``lors``: LoRS (docs/methods.md#lors) = engine(unroll=tesla, similarity=lowrank(r, α), loss=wbce, raw).

Images, caption features, the inner learning rates and a low-rank target similarity S = diag(a) + (α/r)·L Rᵀ
(init I) are distilled with the TESLA detached-chain gradient and the weighted BCE loss.

Presets:

* ``paper`` — the rows of the published scripts (docs/methods.md#lors-hyperparameters), per dataset and budget: batch b, start window, lr_img =
  lr_txt, lr_lr, lr_sim, rank, α, merged normalisation for COCO, iterations; η0 = 0.1, all momenta 0.5, P = 8,
  E = 1. Unknown datasets use Flickr30k's rows, unknown budgets the nearest row. Differences from the scripts,
  each reproducible by a ``bug_compat`` flag: exact budgets N (the scripts distil N−1: ``n_minus_one``); the
  η-gradient is the gradient of the (merged) objective (``lr_grad_separate_norm`` restores the per-tower
  normalisation); COCO-500 distils at the experts' τ (``inner_temperature: 0.1`` reproduces its τ = 0.1); the
  recompute pass replays dropout (``dropout_resample``). The scripts run Iteration+1 updates; here exactly
  ``iterations``. Initial pairs are clean (not augmented).
* ``quick`` — CPU-scale defaults (quick CNN, MiniLM features): P = 4, b = 25, lr_img = lr_txt = 100,
  lr_lr = 0.01, lr_sim = 10, rank 5, α = 1, 40 iterations, ``retain_graph`` (the inner graphs of 4 steps are
  small). Presets override them where a value was chosen on val (``mmdd tune``, records under results/tuning/);
  results live in results/, not here.
"""

from __future__ import annotations

from typing import Any, ClassVar

from methods.matching import ENGINE_DEFAULTS, MatchingMethod, nearest_row
from methods.published_rows import LORS_ROWS, row_params

QUICK: dict[str, Any] = {
    "unroll": "tesla", "retain_graph": True, "similarity": "lowrank", "sim_rank": 5, "sim_alpha": 1.0,
    "loss": "wbce", "normalize": "separate", "syn_steps": 4, "expert_epochs": 1, "batch_size": 25,
    "start_window": [0, 2], "lr_img": 100.0, "lr_txt": 100.0, "lr_lr": 1e-2, "lr_sim": 10.0, "iterations": 40,
}


class LoRS(MatchingMethod):
    """LoRS: TESLA-style matching with a learned low-rank target similarity and the weighted BCE loss."""

    name = "lors"
    defaults: ClassVar[dict[str, dict[str, Any]]] = {"quick": QUICK, "paper": {},
                                                      "tiny": dict(QUICK, syn_steps=2, iterations=3, batch_size=5)}

    @classmethod
    def paper_params(cls, dataset: str, budget: int) -> dict[str, Any]:
        return dict(ENGINE_DEFAULTS, **row_params(nearest_row(LORS_ROWS, dataset, budget, cls.name)))
