"""Prepared artifacts built from the training pairs (``ArtifactKind.needs_train_data``), on RepBlend's head-only
experts: built once per dataset by the real ``prepare`` stage and reused by every cell, verified and rebuilt when
tampered with, built from the train split only, and made stale in dvc.yaml by editing the data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmark.stages.cells import Cell
from benchmark.stages.context import StageContext
from benchmark.stages.distill import distill
from benchmark.stages.prepare import MANIFEST, build_context, check_prepared, method_requirements, prepare
from helpers import tiny_context
from methods.matching import heads
from methods.matching.artifacts import HeadExpertsArtifact, ShortcutArtifact

DS, METHOD = "shapes", "repblend"


@pytest.fixture
def root(tiny_project, tmp_path) -> Path:
    """A private copy of the tiny project's data (fetched, embedded, experts trained)."""
    shutil.copytree(tiny_project[0] / "data", tmp_path / "data")
    return tmp_path


def context(root: Path, *overrides: str) -> StageContext:
    return tiny_context(root, [f"grid.methods=[{METHOD}]", *overrides])


def head_dir(ctx: StageContext) -> Path:
    (req,) = [r for r in method_requirements(ctx, DS, METHOD) if r.kind == "head-experts"]
    return ctx.prepared_dir(DS, METHOD) / req.id


def stamps(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.iterdir())}


@pytest.fixture
def counted(monkeypatch):
    """Counts of head experts trained and of training-pair loads (the real functions, wrapped)."""
    counts = {"trained": 0, "loads": 0}
    train_one, load = heads.train_head_expert, StageContext.train_data

    def train_counted(*a, **k):
        counts["trained"] += 1
        return train_one(*a, **k)

    def load_counted(self, ds):
        counts["loads"] += 1
        return load(self, ds)

    monkeypatch.setattr(heads, "train_head_expert", train_counted)
    monkeypatch.setattr(StageContext, "train_data", load_counted)
    return counts


def test_head_experts_are_built_once_per_dataset_and_reused_by_every_cell(root, counted):
    ctx = context(root)
    prepare(ctx, DS, METHOD)
    directory = head_dir(ctx)
    count = ctx.cfg.cell_params(METHOD, DS, 10)["head_experts"]["count"]
    assert counted == {"trained": count, "loads": 1}
    before = stamps(directory)
    assert sorted(before) == [f"expert_{k:03d}.{x}" for k in range(count) for x in ("json", "safetensors")]

    cells = [Cell(DS, METHOD, 10, 0), Cell(DS, METHOD, 20, 1)]  # two budgets, two seeds: one artifact
    for cell in cells:
        distill(ctx, cell, force=True)
    assert counted["trained"] == count and stamps(directory) == before  # no cell trained or rewrote an expert

    prepare(context(root), DS, METHOD)  # a rerun with current files: nothing trained, the pairs never loaded
    assert counted["trained"] == count and stamps(directory) == before
    assert counted["loads"] == 1 + len(cells)


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_tampered_or_partial_head_expert_is_rejected_then_rebuilt_alone(root, counted):
    ctx = context(root)
    prepare(ctx, DS, METHOD)
    directory = head_dir(ctx)
    original = {p.name: p.read_bytes() for p in directory.iterdir()}
    trained = counted["trained"]

    flip_last_byte(directory / "expert_001.safetensors")  # a flipped bit in a tensor
    (directory / "expert_000.json").unlink()  # an interrupted write: no sidecar
    with pytest.raises(ValueError, match=r"head expert file .*expert_000\.safetensors is corrupt or incomplete.*"
                                         r"`mmdd prepare`"):
        distill(ctx, Cell(DS, METHOD, 10, 0), force=True)
    corrupt = heads.HeadExpertTrajectory.open(directory / "expert_001.safetensors")
    with pytest.raises(ValueError, match=r"expert_001\.safetensors is corrupt: tensor 'txt\.e\d+'.*`mmdd prepare`"):
        [corrupt.read(m, e) for m in ("img", "txt") for e in range(corrupt.num_timestamps)]

    prepare(context(root), DS, METHOD)
    assert counted["trained"] == trained + 2  # exactly the two damaged experts, bit-identical to the first build
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == original

    (ctx.prepared_dir(DS, METHOD) / MANIFEST).unlink()  # prepare interrupted before its manifest
    with pytest.raises(FileNotFoundError, match="holds no prepared artifacts: run `mmdd prepare"):
        distill(ctx, Cell(DS, METHOD, 10, 0), force=True)


def test_the_builder_reaches_the_train_split_only(root, monkeypatch):
    """Loading any split but train (annotations, caption features, evaluation data) fails the test; prepare builds
    the head experts all the same, from the training pairs it is handed."""
    calls = []

    def train_only(original):
        def guarded(self, ds, split, *a, **k):
            calls.append(split)
            assert split == "train", f"the prepare stage loaded the {split!r} split"
            return original(self, ds, split, *a, **k)
        return guarded

    for name in ("caption_split", "features", "eval_split"):
        monkeypatch.setattr(StageContext, name, train_only(getattr(StageContext, name)))
    ctx = context(root)
    prepare(ctx, DS, METHOD)
    assert calls and set(calls) == {"train"}
    assert len(list(head_dir(ctx).glob("expert_*.safetensors"))) == ctx.cfg.cell_params(METHOD, DS, 10)[
        "head_experts"]["count"]

    wanted = build_context(ctx, DS, HeadExpertsArtifact(), root / "x")
    assert wanted.train_pairs().n_pairs == ctx.train_data(DS).n_pairs == ctx.cfg.data.shapes.n_train * 3
    assert wanted.train_id == ctx.data_id(DS) and wanted.student == ctx.student
    other = build_context(ctx, DS, ShortcutArtifact(), root / "y")  # a kind that does not declare the data
    assert other.load_train is None and other.train_id is None
    with pytest.raises(RuntimeError, match="needs_train_data = True"):
        other.train_pairs()


def test_other_training_data_makes_the_prepared_experts_stale(root):
    ctx = context(root)
    prepare(ctx, DS, METHOD)
    reqs = method_requirements(ctx, DS, METHOD)
    assert check_prepared(ctx, DS, METHOD, reqs) == ctx.prepared_dir(DS, METHOD)
    with pytest.raises(ValueError, match="another expert set or training data.*mmdd prepare"):
        check_prepared(context(root, "data.norm=clip"), DS, METHOD, reqs)


def test_prepare_stage_depends_on_the_data_only_for_kinds_that_read_it():
    from benchmark.params import resolve
    from benchmark.stages.graph import render

    cfg = resolve("tiny", ["grid.methods=[repblend,ptm-st]"])
    stages = render(cfg, Path(__file__).resolve().parents[1])["stages"]
    heads_stage, shortcut_stage = stages["prepare-repblend"]["do"], stages["prepare-ptm-st"]["do"]
    for dep in ("data/raw/${item}", "data/features/${item}", "data/experts/${item}"):
        assert dep in heads_stage["deps"]
    assert "student" in heads_stage["params"] and "methods.repblend.${item}" in heads_stage["params"]
    assert "data/raw/${item}" not in shortcut_stage["deps"] and "data/features/${item}" not in shortcut_stage["deps"]
    assert "data/experts/${item}" in shortcut_stage["deps"]
