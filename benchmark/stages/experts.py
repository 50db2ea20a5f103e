"""Stage ``experts``: the dataset's expert trajectories (the students' architecture trained on the full data)."""

from __future__ import annotations

from pathlib import Path

from benchmark.experts.train import train_experts
from benchmark.interface import TrainData
from benchmark.stages.cells import tree_digest
from benchmark.stages.code_deps import code_digest
from benchmark.stages.context import EXPERTS_CODE, StageContext


def experts(ctx: StageContext, ds: str, indices: list[int] | None = None) -> list[Path]:
    """Train (or keep, when complete and of this configuration) the experts ``indices`` (default: all)."""
    train = ctx.train_data(ds)
    if ctx.cfg.data.train_augment != "none":
        split = ctx.caption_split(ds, "train")
        train = TrainData(ctx.images(ds, split, "train"), train.texts, train.caption_image, train.captions)
    return train_experts(ctx.experts_dir(ds), train, ctx.student, ctx.cfg.experts, ctx.data_id(ds), ctx.device,
                         indices, ctx.progress, code_digest(EXPERTS_CODE))


def experts_digest(ctx: StageContext, ds: str) -> str:
    """Identity of the dataset's expert set: its configuration and every expert's sidecar (which records the
    expert file's content hash)."""
    directory = ctx.experts_dir(ds)
    sidecars = sorted(directory.glob("expert_*.json"))
    if not sidecars:
        raise FileNotFoundError(f"no expert trajectories in {directory}: run `mmdd experts` first")
    return tree_digest(sidecars, directory) + ":" + ctx.expert_config_hash(ds)
