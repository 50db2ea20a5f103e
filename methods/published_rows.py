"""The per-dataset/budget rows of the published LoRS scripts (docs/methods.md#lors), shared by ``lors`` and
``tesla-vl`` (which published no rows of its own) when ``mmdd init-params`` resolves the ``paper`` profile."""

from __future__ import annotations

from typing import Any

# (b, max_start, lr_img=lr_txt, lr_sim, rank, alpha, merged, iterations) per dataset and nominal budget
LORS_ROWS: dict[str, dict[int, tuple]] = {
    "flickr30k": {100: (20, 2, 100.0, 10.0, 10, 3.0, False, 3000),
                  200: (20, 2, 1000.0, 10.0, 5, 1.0, False, 3000),
                  500: (40, 3, 1000.0, 100.0, 20, 0.01, False, 3000)},
    "coco": {100: (20, 2, 1000.0, 5.0, 10, 1.0, True, 3000),
             200: (20, 2, 1000.0, 50.0, 20, 1.0, True, 2000),
             500: (30, 2, 5000.0, 500.0, 40, 1.0, True, 3000)},
}


def row_params(row: tuple) -> dict[str, Any]:
    b, max_start, lr, lr_sim, rank, alpha, merged, iters = row
    return {"unroll": "tesla", "similarity": "lowrank", "loss": "wbce", "sim_rank": rank, "sim_alpha": alpha,
            "normalize": "merged" if merged else "separate", "syn_steps": 8, "expert_epochs": 1, "batch_size": b,
            "start_window": [0, max_start], "lr_img": lr, "lr_txt": lr, "lr_lr": 1e-2, "lr_sim": lr_sim,
            "lr_init_img": 0.1, "lr_init_txt": 0.1, "momentum": 0.5, "momentum_lr": 0.5, "momentum_sim": 0.5,
            "iterations": iters, "checkpoint_every": 100}
