"""Stage ``evaluate``: fresh students trained on a cell's distilled set, measured on the test split.

Outputs: ``metrics.json`` (per protocol, per student and mean ± std; pure function of the set's bytes, the
evaluation settings and the test data) and ``artifacts/`` (image grid, nearest captions, loss curve). The wall time
goes to ``evaluate.volatile.json``. MLflow is not this stage's business: the CLI records the results around it
(:mod:`benchmark.tracking.recorder`), so a tracking failure never loses computed work and a change to how runs
are recorded never makes this stage stale.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmark.distilled import DistilledSet
from benchmark.evaluation import EvalConfig, evaluate_set
from benchmark.io import read_json, write_json
from benchmark.seeding import derive_seed
from benchmark.stages.cells import Cell, file_digest, hash_json, read_history
from benchmark.stages.code_deps import code_digest
from benchmark.stages.context import StageContext
from benchmark.students_batched import evaluate_set_batched, use_batched

log = logging.getLogger(__name__)


def split_id(ctx: StageContext, ds: str, split: str) -> str:
    """Identity of an evaluation split: the bytes of its caption features and the image pipeline."""
    d = ctx.cfg.data
    return hash_json([ds, split, file_digest(ctx.features_path(ds, split)), ctx.image_size, d.norm])


def cell_eval_config(ctx: StageContext, cell: Cell) -> EvalConfig:
    """The evaluation settings of one cell: its students' seeds derive from ``eval.seed`` and the grid seed, so a
    grid seed is an independent replicate of distillation *and* evaluation (student initialisation, data order,
    dropout), while every method evaluated under the same grid seed shares those students (paired comparisons)."""
    return replace(ctx.cfg.eval, seed=derive_seed(ctx.cfg.eval.seed, "grid-seed", cell.seed))


def evaluate_key(ctx: StageContext, cell: Cell, cell_dir: Path) -> str:
    """Everything ``metrics.json`` is a function of: the code that runs, the set's bytes (not only its JSON), the
    evaluation settings and the test split."""
    for name in ("distilled.safetensors", "distilled.json"):
        if not (cell_dir / name).is_file():
            raise FileNotFoundError(f"{cell_dir / name} is missing: run `mmdd distill` for this cell")
    ecfg, ds = cell_eval_config(ctx, cell), cell.dataset
    return hash_json({"code": code_digest(("benchmark.stages.evaluate",)),
                      "set": [file_digest(cell_dir / "distilled.safetensors"),
                              file_digest(cell_dir / "distilled.json")],
                      "eval": asdict(ecfg), "student": asdict(ctx.student), "test": split_id(ctx, ds, "test"),
                      "val": split_id(ctx, ds, "val") if ecfg.select == "val" else None})


def evaluate(ctx: StageContext, cell: Cell, force: bool = False, students: str = "auto") -> dict[str, Any]:
    """Evaluate one cell's set; returns (and writes) ``metrics.json``. ``students``: how the students are trained
    (:func:`benchmark.students_batched.use_batched`; equal up to rounding, so not part of the key, like the device)."""
    cell_dir = ctx.cell_dir(cell)
    key = evaluate_key(ctx, cell, cell_dir)
    out_path = cell_dir / "metrics.json"
    if not force and out_path.exists() and (cell_dir / "artifacts").is_dir() and read_json(out_path).get("key") == key:
        return read_json(out_path)
    dset = DistilledSet.load(cell_dir / "distilled")
    dset.validate(budget=cell.budget, image_shape=(3, ctx.image_size, ctx.image_size),
                  text_dim=ctx.student.text_dim)
    ecfg = cell_eval_config(ctx, cell)
    val = ctx.eval_split(cell.dataset, "val") if ecfg.select == "val" else None
    batched = use_batched(students, ctx.device, ecfg.students)
    run = evaluate_set_batched if batched else evaluate_set
    t0 = time.perf_counter()
    res = run(dset, ctx.student, ecfg, ctx.eval_split(cell.dataset, "test"), val, ctx.device, ctx.progress)
    seconds = time.perf_counter() - t0
    res.update({"key": key, "eval_seed": ecfg.seed, "pairs": dset.pairs, "bytes": dset.nbytes, "method": cell.method, "budget": cell.budget,
                "seed": cell.seed, "dataset": cell.dataset})
    write_json(out_path, res)
    cell_artifacts(ctx, cell, cell_dir, dset)
    volatile = {"eval_seconds": seconds, "eval_students": "batched" if batched else "sequential"}
    distill_volatile = cell_dir / "distill.volatile.json"
    if distill_volatile.exists():
        volatile |= {f"distill_{k}": v for k, v in read_json(distill_volatile).items() if k not in ("pairs", "bytes")}
    write_json(cell_dir / "evaluate.volatile.json", volatile)
    return res


def cell_artifacts(ctx: StageContext, cell: Cell, cell_dir: Path, dset: DistilledSet) -> list[Path]:
    """Image grid, nearest training caption per distilled text, loss curve (``<cell>/artifacts/``)."""
    from benchmark.artifacts import save_image_grid, save_loss_curve, save_nearest_captions

    out = cell_dir / "artifacts"
    images = torch.cat([p.images for p in dset.phases])
    texts = torch.cat([p.texts for p in dset.phases])
    train_texts, _ = ctx.features(cell.dataset, "train")  # captions and features only: no image decoding here
    captions = ctx.caption_split(cell.dataset, "train").captions
    paths = [save_image_grid(images, ctx.cfg.data.norm, out / "images.png"),
             save_nearest_captions(texts, train_texts, captions, out / "nearest_captions.tsv")]
    curve = save_loss_curve(read_history(cell_dir), out / "loss_curve.png", str(cell))
    return paths + ([curve] if curve else [])
