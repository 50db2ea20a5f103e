"""Independent seeds, method variants, like-for-like reference rows and val-only tuning (issue: ranking)."""

from __future__ import annotations

import pytest
import torch
import yaml

from benchmark.cli import main
from benchmark.distilled import DistilledSet
from benchmark.evaluation import evaluate_set, score
from benchmark.io import read_json
from benchmark.models.student import build_student
from benchmark.params import resolve
from benchmark.registry import get_method, split_variant
from benchmark.seeding import derive_seed
from benchmark.stages.cells import Cell
from benchmark.stages.evaluate import cell_eval_config
from helpers import tiny_context


def _preset(tmp_path, **extra):
    doc = yaml.safe_load(open("benchmark/presets/tiny.yaml"))
    doc.update(extra)
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_variant_is_its_base_method_with_its_own_overrides(tmp_path):
    preset = _preset(tmp_path, grid={"methods": ["tesla-vl", "tesla-vl__late"], "budgets": [10], "seeds": [0]},
                     methods={"tesla-vl": {"iterations": 5}, "tesla-vl__late": {"start_window": [1, 2]}})
    cfg = resolve(preset)
    base, late = cfg.cell_params("tesla-vl", "shapes", 10), cfg.cell_params("tesla-vl__late", "shapes", 10)
    assert get_method("tesla-vl__late") is get_method("tesla-vl")
    assert split_variant("tesla-vl__late") == ("tesla-vl", "late")
    assert late["iterations"] == base["iterations"] == 5  # inherits the base's preset overrides
    assert late["start_window"] == [1, 2] and base["start_window"] != [1, 2]
    assert {k: v for k, v in late.items() if k != "start_window"} == \
        {k: v for k, v in base.items() if k != "start_window"}


def test_variant_without_overrides_is_refused(tmp_path):
    preset = _preset(tmp_path, grid={"methods": ["tesla-vl__late"], "budgets": [10], "seeds": [0]})
    with pytest.raises(ValueError, match="tesla-vl__late.*no parameter overrides"):
        resolve(preset)


def test_grid_seed_changes_the_evaluation_students(tiny_project):
    root, args = tiny_project
    ctx = tiny_context(root)
    seeds = {s: cell_eval_config(ctx, Cell("shapes", "random", 10, s)).seed for s in (0, 1)}
    assert seeds[0] != seeds[1]
    # methods share the students of a grid seed: comparisons by seed are paired
    assert cell_eval_config(ctx, Cell("shapes", "herding", 10, 0)).seed == seeds[0]
    inits = [build_student(ctx.student, seed=derive_seed(seeds[s], "eval-student", 0)) for s in (0, 1)]
    w0, w1 = (next(m.image_encoder.parameters()) for m in inits)
    assert not torch.equal(w0, w1)
    # the same set, evaluated under two grid seeds, gives different students and so different numbers
    assert main(["distill", *args, "--method", "random", "--budget", "10", "--seed", "0"]) == 0
    dset = DistilledSet.load(ctx.cell_dir(Cell("shapes", "random", 10, 0)) / "distilled")
    test = ctx.eval_split("shapes", "test")
    runs = [evaluate_set(dset, ctx.student, cell_eval_config(ctx, Cell("shapes", "random", 10, s)), test,
                         progress=False)["protocols"]["strict"]["students"] for s in (0, 1)]
    assert runs[0] != runs[1]


def test_reference_rows_like_for_like(tiny_project, tmp_path):
    root, args = tiny_project
    args = args[:-3] + ["--results-root", str(tmp_path / "results"), "--no-progress"]
    params = yaml.safe_load(open(root / "params.yaml"))
    params["full_data"]["expert_epochs"] = [0]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args[1] = str(tmp_path / "params.yaml")
    assert main(["full-data", *args]) == 0
    out = tmp_path / "results" / "cells" / "tiny" / "shapes" / "full-data"
    docs = {p.name: read_json(p) for p in out.glob("metrics*.json")}
    assert set(docs) == {"metrics.json", "metrics_teacher_sgd.json", "metrics_expert_final.json",
                         "metrics_expert_e0.json"}
    assert docs["metrics_expert_final.json"]["method"] == f"expert @ epoch {params['experts']['epochs']}"
    assert all(d["reference"] for d in docs.values())
    # the experts at epoch 0 are their seeded initialisations: the row equals those untrained students' recall
    ctx = tiny_context(root)
    test = ctx.eval_split("shapes", "test")
    want = [score(build_student(ctx.student, seed=derive_seed(params["experts"]["seed"], "expert", k)), test, "cpu")
            for k in range(params["experts"]["num_experts"])]
    got = docs["metrics_expert_e0.json"]["protocols"]["strict"]["students"]
    assert [g["r_mean"] for g in got] == pytest.approx([w["r_mean"] for w in want])
    assert len(docs["metrics_teacher_sgd.json"]["protocols"]["strict"]["students"]) == params["eval"]["students"]
    # cached: a second run recomputes nothing
    before = {p: p.stat().st_mtime_ns for p in out.glob("metrics*.json")}
    assert main(["full-data", *args]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("metrics*.json")}


def test_tune_scores_on_val_and_never_reads_test(tiny_project, tmp_path):
    from benchmark.stages.tune import tune

    root, _ = tiny_project
    ctx = tiny_context(root, results=tmp_path / "results")
    reads = []
    real = ctx.eval_split

    def spy(ds, split):
        reads.append(split)
        if split == "test":
            raise AssertionError("tuning read the test split")
        return real(ds, split)

    ctx.eval_split = spy
    with pytest.raises(ValueError, match="grid seeds"):
        tune(ctx, "random", "shapes", 10, "lr_img", [0.01], [0])
    rec = tune(ctx, "random", "shapes", 10, "lr_img", [0.001, 0.1], [1000])
    entry = rec["params"]["lr_img"]
    assert set(reads) == {"val"}
    assert entry["split"] == "val" and entry["seeds"] == [1000]
    assert entry["chosen"] in (0.001, 0.1)
    best = max(entry["candidates"], key=lambda c: c["val_r_mean"])
    assert entry["chosen"] == best["value"]
    assert (tmp_path / "results" / "tuning" / "tiny" / "shapes" / "random.json").exists()
