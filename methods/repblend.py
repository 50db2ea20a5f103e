"""``repblend``: RepBlend (NeurIPS 2025, docs/methods.md#repblend) = engine(unroll=tesla, similarity=lowrank,
loss=wbce, raw) on the frozen-encoder student (``student=heads``) with representation blending (``blend_alpha``).

LoRS with two changes: the student is a FROZEN image encoder + image ProjectionHead + text ProjectionHead, and only
the two heads are trained by the experts and matched (symmetric projection matching); and every inner step mixes
the encoder features and the synthetic texts of its batch with one M = λI + (1−λ)P, λ ~ Beta(α_b, α_b), replayed by
both passes (the target S_B is not mixed). Data gradients reach the pixels through the frozen encoder to first
order: ∂J/∂U is summed over the inner steps, then one encoder backward per sample used (``encoder_grad``).

Presets:

* ``paper`` — the rows of the published scripts (docs/methods.md#repblend-hyperparameters) per dataset and budget:
  start window, lr_img = lr_txt, lr_sim, rank, α, merged normalisation for COCO; b = 20, P = 8, E = 1,
  lr_lr = 0.01, η0 = 0.1, momenta 0.5, α_b = 1, 3,000 iterations; frozen NFNet-L0 with its timm ImageNet weights
  (``frozen_encoder: pretrained``); head experts 20 × 10 epochs, SGD 0.1/0.1, batch 128. The η-gradient uses the
  separate normalisation even when the loss is merged (the method's definition: ``lr_grad_separate_norm``).
  Differences from the scripts, each reproducible by a ``bug_compat`` flag: exact budgets N (``n_minus_one``);
  COCO-500 distils at the experts' τ (``inner_temperature: 0.1`` reproduces its τ = 0.1); the recompute pass
  replays dropout (``dropout_resample``). Initial pairs and head experts use clean (not augmented) images.
* ``quick`` — CPU-scale defaults on LoRS's quick values (P = 4, b = 25, lr_img = lr_txt = 100, lr_lr = 0.01,
  lr_sim = 10, rank 5, α = 1, 40 iterations) with α_b = 1; the frozen encoder is harness expert 0's image tower at
  its last epoch (``frozen_encoder: expert``); head experts 8 × 10 epochs (the default preset's expert recipe).

Head experts are prepared once per dataset (``mmdd prepare --method repblend``), trained only up to the last epoch
the start windows reach.
  ``tiny``: 2 × 2 head experts, P = 2, 3 iterations.
"""

from __future__ import annotations

from typing import Any, ClassVar

from benchmark.requirements import EXPERTS, Requirement
from methods.matching import ENGINE_DEFAULTS, MatchingMethod, nearest_row
from methods.matching.artifacts import head_experts_requirement
from methods.matching.config import REPRESENTATION_DEFAULTS, EngineConfig

HEADS: dict[str, Any] = dict(REPRESENTATION_DEFAULTS, student="heads", blend_alpha=1.0)

QUICK: dict[str, Any] = {
    **HEADS, "unroll": "tesla", "retain_graph": True, "similarity": "lowrank", "sim_rank": 5, "sim_alpha": 1.0,
    "loss": "wbce", "normalize": "separate", "syn_steps": 4, "expert_epochs": 1, "batch_size": 25,
    "start_window": [0, 2], "lr_img": 100.0, "lr_txt": 100.0, "lr_lr": 1e-2, "lr_sim": 10.0, "iterations": 40,
    "bug_compat": {"lr_grad_separate_norm": True},
    "head_experts": {"count": 8, "epochs": 10, "lr_img": 0.1, "lr_txt": 0.1, "batch_size": 128, "seed": 0},
}
TINY: dict[str, Any] = dict(QUICK, syn_steps=2, iterations=3, batch_size=5,
                            head_experts={"count": 2, "epochs": 2, "lr_img": 0.1, "lr_txt": 0.1, "batch_size": 64,
                                          "seed": 0})

# (max_start, lr_img = lr_txt, lr_sim, rank, alpha, merged) per dataset and nominal budget (REFERENCE_REPBLEND §3)
REPBLEND_ROWS: dict[str, dict[int, tuple]] = {
    "flickr30k": {100: (2, 100.0, 10.0, 10, 3.0, False),
                  200: (2, 1000.0, 10.0, 5, 1.0, False),
                  500: (3, 1000.0, 100.0, 20, 0.01, False)},
    "coco": {100: (2, 1000.0, 5.0, 10, 1.0, True),
             200: (2, 1000.0, 50.0, 20, 1.0, True),
             500: (2, 5000.0, 500.0, 40, 1.0, True)},
}


def paper_row(row: tuple) -> dict[str, Any]:
    max_start, lr, lr_sim, rank, alpha, merged = row
    return {**HEADS, "frozen_encoder": "pretrained", "unroll": "tesla", "similarity": "lowrank", "loss": "wbce",
            "sim_rank": rank, "sim_alpha": alpha, "normalize": "merged" if merged else "separate", "syn_steps": 8,
            "expert_epochs": 1, "batch_size": 20, "start_window": [0, max_start], "lr_img": lr, "lr_txt": lr,
            "lr_lr": 1e-2, "lr_sim": lr_sim, "lr_init_img": 0.1, "lr_init_txt": 0.1, "momentum": 0.5,
            "momentum_lr": 0.5, "momentum_sim": 0.5, "iterations": 3000, "checkpoint_every": 100,
            "bug_compat": {"lr_grad_separate_norm": True},
            "head_experts": {"count": 20, "epochs": 10, "lr_img": 0.1, "lr_txt": 0.1, "batch_size": 128, "seed": 0}}


class RepBlend(MatchingMethod):
    """RepBlend: LoRS-style matching of two projection heads over a frozen image encoder, with representation blending."""

    name = "repblend"
    defaults: ClassVar[dict[str, dict[str, Any]]] = {"quick": QUICK, "paper": {}, "tiny": TINY}

    @classmethod
    def paper_params(cls, dataset: str, budget: int) -> dict[str, Any]:
        return dict(ENGINE_DEFAULTS, **paper_row(nearest_row(REPBLEND_ROWS, dataset, budget, cls.name)))

    @classmethod
    def requirements(cls, params: dict[str, Any], budget: int) -> list[Requirement]:
        """The head-only experts (a ``head-experts`` artifact that ``mmdd prepare`` builds once per dataset), plus the
        harness experts when the frozen encoder is taken from one of them (docs/methods.md#repblend)."""
        cfg = EngineConfig.from_params(params, budget)  # fails early, naming the field
        heads = head_experts_requirement(cfg)
        return [Requirement(EXPERTS), heads] if cfg.representation.frozen_encoder == "expert" else [heads]
