"""``mmdd tune``: choose a method's hyperparameter on the **val** split (never test) and record how.

For each candidate value, the cell is distilled with that value (other parameters as in params.yaml) for each tuning
seed — seeds kept apart from the grid's, so a tuned value is never scored on the sets the table reports — and
evaluated by the cell's students (strict protocol, final model) on val. The value with the highest mean val r_mean
is chosen. The record, ``results/tuning/<preset>/<dataset>/<method>.json``, keeps every candidate's per-seed val
numbers, the rule and the chosen value; put that value into the preset's ``methods:`` section (its comment points
at the record). Distilled candidates are cached under ``results/tuning/<preset>/work/`` (git-ignored).
"""

from __future__ import annotations

import copy
import logging
import statistics
from dataclasses import replace
from typing import Any

from benchmark.config import budget_key
from benchmark.distilled import DistilledSet
from benchmark.evaluation import SplitData, evaluate_set
from benchmark.io import read_json, write_json
from benchmark.paths import Layout
from benchmark.stages.cells import Cell
from benchmark.stages.context import StageContext
from benchmark.stages.distill import distill
from benchmark.stages.evaluate import cell_eval_config

log = logging.getLogger(__name__)
RULE = "highest mean val r_mean over the tuning seeds (strict protocol, final model); ties: the first value listed"


def candidate_context(ctx: StageContext, cell: Cell, param: str, value: Any) -> StageContext:
    """``ctx`` with ``cell``'s parameter ``param`` set to ``value`` (``"lr_img,lr_txt"`` sets both to the same value)
    and results under the tuning work directory."""
    params = ctx.cfg.cell_params(cell.method, cell.dataset, cell.budget)
    names = param.split(",")
    for name in names:
        if name not in params:
            raise ValueError(f"method {cell.method!r} has no parameter {name!r}; known: {sorted(params)}")
    cfg = copy.deepcopy(ctx.cfg)
    for name in names:
        cfg.methods[cell.method][cell.dataset][budget_key(cell.budget)][name] = value
    work = ctx.layout.results_root / "tuning" / cfg.preset / "work" / f"{param}={value}"
    return StageContext(cfg, Layout(ctx.layout.data_root, work), ctx.device, progress=False)


def val_score(ctx: StageContext, cell: Cell, val: SplitData) -> float:
    """Mean val r_mean of the cell's evaluation students (distils the cell first if needed)."""
    cell_dir = distill(ctx, cell)
    dset = DistilledSet.load(cell_dir / "distilled")
    ecfg = replace(cell_eval_config(ctx, cell), protocols=["strict"], select="final")
    res = evaluate_set(dset, ctx.student, ecfg, val, None, ctx.device, False)
    return float(res["protocols"]["strict"]["r_mean"]["mean"])


def tune(ctx: StageContext, method: str, dataset: str, budget: int, param: str, values: list[Any],
         seeds: list[int]) -> dict[str, Any]:
    """Score every candidate value on val; write and return the record (see the module docstring)."""
    if set(seeds) & set(ctx.cfg.grid.seeds):
        raise ValueError(f"tuning seeds {sorted(set(seeds) & set(ctx.cfg.grid.seeds))} are grid seeds: choose "
                         "seeds outside grid.seeds (e.g. --seed 1000)")
    if not values:
        raise ValueError("give at least one candidate value (--values)")
    val = ctx.eval_split(dataset, "val")  # the only split tuning reads besides train
    candidates = []
    for value in values:
        cctx = candidate_context(ctx, Cell(dataset, method, budget, seeds[0]), param, value)
        scores = {s: val_score(cctx, Cell(dataset, method, budget, s), val) for s in seeds}
        mean = statistics.fmean(scores.values())
        log.info("%s %s=%r: val r_mean %.2f (%s)", method, param, value, mean,
                 ", ".join(f"seed {s}: {v:.2f}" for s, v in scores.items()))
        candidates.append({"value": value, "val_r_mean": mean, "per_seed": {str(s): v for s, v in scores.items()}})
    best = max(range(len(candidates)), key=lambda i: (candidates[i]["val_r_mean"], -i))
    path = ctx.layout.results_root / "tuning" / ctx.cfg.preset / dataset / f"{method}.json"
    record = read_json(path) if path.exists() else {"method": method, "dataset": dataset, "params": {}}
    record["params"][param] = {
        "budget": budget, "seeds": seeds, "rule": RULE, "split": "val", "chosen": candidates[best]["value"],
        "candidates": candidates,
        "fixed": {k: v for k, v in ctx.cfg.cell_params(method, dataset, budget).items()
                  if k not in param.split(",")},
        "eval": {"students": ctx.cfg.eval.students, "epochs": ctx.cfg.eval.epochs}}
    write_json(path, record)
    log.info("%s: chose %s=%r on val; record: %s", method, param, candidates[best]["value"], path)
    return record
