"""``tesla-vl``: TESLA-style matching for image-text pairs = engine(unroll=tesla, similarity=none, loss=ce, raw).

The memory-efficient detached-chain gradient of docs/methods.md#tesla (constant memory in the number of inner
steps; cross-step Hessian terms dropped, η-gradient with G held constant) on images, caption features and the
inner learning rates, without a learned similarity: LoRS with S = I and the CLIP loss.

Presets:

* ``paper`` — no TESLA-VL configuration was published on its own; the LoRS scripts' per-dataset/budget rows
  (docs/methods.md#tesla-vl-hyperparameters: batch, start window, lr_img = lr_txt, lr_lr, merged normalisation for COCO, iterations) are used with
  ``similarity=none`` and ``loss=ce``. Exact budgets by default (``bug_compat.n_minus_one`` for 99/199/499).
* ``quick`` — LoRS's quick values without the similarity: P = 4, b = 25, lr_img = lr_txt = 100, lr_lr = 0.01,
  40 iterations, ``retain_graph`` (CPU-scale defaults; presets override what they tune on val, records under
  results/tuning/).
"""

from __future__ import annotations

from typing import Any, ClassVar

from methods.matching import ENGINE_DEFAULTS, MatchingMethod, nearest_row
from methods.published_rows import LORS_ROWS, row_params

QUICK: dict[str, Any] = {
    "unroll": "tesla", "retain_graph": True, "similarity": "none", "loss": "ce", "normalize": "separate",
    "syn_steps": 4, "expert_epochs": 1, "batch_size": 25, "start_window": [0, 2], "lr_img": 100.0, "lr_txt": 100.0,
    "lr_lr": 1e-2, "iterations": 40,
}


class TeslaVL(MatchingMethod):
    """TESLA-VL: detached-chain (constant-memory) matching of image-text pairs, CLIP loss."""

    name = "tesla-vl"
    defaults: ClassVar[dict[str, dict[str, Any]]] = {"quick": QUICK, "paper": {},
                                                      "tiny": dict(QUICK, syn_steps=2, iterations=3, batch_size=5)}

    @classmethod
    def paper_params(cls, dataset: str, budget: int) -> dict[str, Any]:
        p = row_params(nearest_row(LORS_ROWS, dataset, budget, cls.name))
        p.update(similarity="none", loss="ce")
        return dict(ENGINE_DEFAULTS, **p)
