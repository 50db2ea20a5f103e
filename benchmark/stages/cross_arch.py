"""Stage ``cross-arch``: a cell's distilled set trained on students of other image towers
(docs/protocols.md#cross-architecture-evaluation, :mod:`benchmark.cross_arch`).

Output: ``cross_arch.json`` per cell, per tower the strict-protocol metrics of ``cross_arch.students`` students (per
student and mean ± std) — a pure function of the set's bytes, the evaluation settings, the towers' configs (and the
frozen encoder's experts for ``heads``), the test data and the code. Wall time per tower goes to
``cross_arch.volatile.json``. The ``evaluate`` stage and its ``metrics.json`` are untouched.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmark.config import BenchConfig
from benchmark.cross_arch import (HEADS, cross_eval_config, encode_images, heads_student, map_images, resize_images,
                                  resolved_towers, tower_student)
from benchmark.distilled import DistilledSet
from benchmark.evaluation import SplitData, evaluate_set
from benchmark.io import read_json, write_json
from benchmark.models.towers import build_image_tower, load_tower_config
from benchmark.stages.cells import Cell, file_digest, hash_json
from benchmark.stages.code_deps import code_digest
from benchmark.stages.context import StageContext
from benchmark.stages.evaluate import cell_eval_config

log = logging.getLogger(__name__)
OUTPUT = "cross_arch.json"
CODE = ("benchmark.stages.cross_arch",)


def cross_towers(cfg: BenchConfig) -> list[str]:
    """The towers this configuration evaluates (``heads`` added when a grid method distils for it)."""
    params = [p for m in cfg.grid.methods for per_ds in (cfg.methods.get(m) or {}).values()
              for p in (per_ds or {}).values()]
    return resolved_towers(cfg.cross_arch, params)


def cross_methods(cfg: BenchConfig) -> list[str]:
    """The grid methods whose sets are evaluated across architectures."""
    return list(cfg.cross_arch.methods or cfg.grid.methods)


def heads_from_experts(tower_config: dict[str, Any]) -> bool:
    """Whether the heads family's frozen encoder is harness expert 0 (no published weights in the tower config)."""
    return tower_config.get("kind") == "convnet" or not tower_config.get("pretrained")


def heads_identity(ctx: StageContext, ds: str) -> dict[str, Any]:
    """What the frozen encoder of the heads family is: published weights, or expert 0's last epoch (by digest)."""
    if not heads_from_experts(ctx.student.tower_config):
        return {"frozen_encoder": "pretrained", "tower": ctx.cfg.student.tower}
    from benchmark.stages.experts import experts_digest

    return {"frozen_encoder": "expert", "expert": 0, "experts": experts_digest(ctx, ds)}


def frozen_encoder(ctx: StageContext, ds: str) -> tuple[nn.Module, int]:
    """(frozen distillation tower, its output width) for the heads family."""
    cfg = ctx.student.tower_config
    if not heads_from_experts(cfg):
        tower = build_image_tower(cfg, pretrained=True)
    else:
        expert = ctx.experts(ds)[0]
        tower = build_image_tower(cfg, pretrained=False)
        flat = expert.read("img", expert.num_timestamps - 1, "cpu")
        params = list(tower.module.parameters())
        if flat.numel() != sum(p.numel() for p in params):
            raise ValueError(f"expert 0 in {ctx.experts_dir(ds)} does not fit the tower {ctx.cfg.student.tower!r}: "
                             "rerun `mmdd experts`")
        torch.nn.utils.vector_to_parameters(flat, params)
    enc = tower.module.to(ctx.device).eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc, tower.out_dim


def test_split_id(ctx: StageContext, ds: str, size: int) -> str:
    """Identity of the test split as a tower of ``size`` px sees it."""
    return hash_json([ds, "test", file_digest(ctx.features_path(ds, "test")), size, ctx.cfg.data.norm])


def tower_identity(ctx: StageContext, ds: str, tower: str) -> Any:
    return heads_identity(ctx, ds) if tower == HEADS else load_tower_config(tower)


def cross_arch_key(ctx: StageContext, cell: Cell, cell_dir: Path, towers: list[str]) -> str:
    """Everything ``cross_arch.json`` is a function of."""
    for name in ("distilled.safetensors", "distilled.json"):
        if not (cell_dir / name).is_file():
            raise FileNotFoundError(f"{cell_dir / name} is missing: run `mmdd distill` for this cell")
    ds = cell.dataset
    sizes = sorted({ctx.image_size if t == HEADS else int(load_tower_config(t)["image_size"]) for t in towers})
    return hash_json({"code": code_digest(CODE),
                      "set": [file_digest(cell_dir / "distilled.safetensors"), file_digest(cell_dir / "distilled.json")],
                      "eval": asdict(cross_eval_config(cell_eval_config(ctx, cell), ctx.cfg.cross_arch)),
                      "student": asdict(ctx.student), "towers": {t: tower_identity(ctx, ds, t) for t in towers},
                      "test": {str(s): test_split_id(ctx, ds, s) for s in sizes}})


def test_split(ctx: StageContext, ds: str, size: int) -> SplitData:
    """The test split with its images decoded at ``size`` px by the usual test transform."""
    if size == ctx.image_size:
        return ctx.eval_split(ds, "test")
    from benchmark.data.images import ImageFolder, load_images
    from benchmark.data.transforms import build_transform

    split = ctx.caption_split(ds, "test")
    feats, txt2img = ctx.features(ds, "test")
    transform = build_transform("test", size, ctx.cfg.data.norm)
    images = (load_images(split.root, split.image_paths, transform, progress=ctx.progress) if ds == "shapes"
              else ImageFolder(split.root, split.image_paths, transform))
    return SplitData(images, feats, txt2img)


def evaluate_tower(ctx: StageContext, cell: Cell, dset: DistilledSet, tower: str,
                   splits: dict[int, SplitData]) -> dict[str, Any]:
    """The strict-protocol evaluation of ``dset`` on ``tower``'s students."""
    ecfg = cross_eval_config(cell_eval_config(ctx, cell), ctx.cfg.cross_arch)
    size = ctx.image_size if tower == HEADS else int(load_tower_config(tower)["image_size"])
    if size not in splits:
        splits[size] = test_split(ctx, cell.dataset, size)
    test = splits[size]
    if tower == HEADS:
        enc, width = frozen_encoder(ctx, cell.dataset)
        dset = map_images(dset, lambda x: encode_images(enc, x, ctx.device))
        test = SplitData(encode_images(enc, test.images, ctx.device), test.texts, test.txt2img)
        student = heads_student(ctx.student, width)
    else:
        dset = map_images(dset, lambda x: resize_images(x, size))
        student = tower_student(ctx.student, tower)
    res = evaluate_set(dset, student, ecfg, test, None, ctx.device, ctx.progress)
    return dict(res, image_size=size, resized=tower != HEADS and size != ctx.image_size)


def cross_arch(ctx: StageContext, cell: Cell, force: bool = False) -> dict[str, Any]:
    """Evaluate one cell's set on every cross-architecture tower; returns (and writes) ``cross_arch.json``."""
    towers = cross_towers(ctx.cfg)
    if not towers:
        raise ValueError("cross_arch.towers is empty in params.yaml: list towers (benchmark/models/configs/ names, "
                         "or heads) under cross_arch.towers in the preset and rerun `mmdd init-params`")
    if cell.method not in cross_methods(ctx.cfg):
        raise ValueError(f"method {cell.method!r} is not in cross_arch.methods {ctx.cfg.cross_arch.methods}: add it "
                         "there (empty: every grid method)")
    cell_dir = ctx.cell_dir(cell)
    key = cross_arch_key(ctx, cell, cell_dir, towers)
    out_path = cell_dir / OUTPUT
    if not force and out_path.exists() and read_json(out_path).get("key") == key:
        return read_json(out_path)
    dset = DistilledSet.load(cell_dir / "distilled")
    dset.validate(budget=cell.budget, image_shape=(3, ctx.image_size, ctx.image_size),
                  text_dim=ctx.student.text_dim)
    results, seconds, splits = {}, {}, {}
    for tower in towers:
        t0 = time.perf_counter()
        results[tower] = evaluate_tower(ctx, cell, dset, tower, splits)
        seconds[tower] = time.perf_counter() - t0
        log.info("%s on %s: strict r_mean %.2f (%.0f s)", cell, tower,
                 results[tower]["protocols"]["strict"]["r_mean"]["mean"], seconds[tower])
    res = {"key": key, "method": cell.method, "budget": cell.budget, "seed": cell.seed, "dataset": cell.dataset,
           "pairs": dset.pairs, "source_tower": ctx.cfg.student.tower, "students": ctx.cfg.cross_arch.students,
           "towers": results}
    write_json(out_path, res)
    write_json(cell_dir / "cross_arch.volatile.json", {"seconds": seconds})
    return res
