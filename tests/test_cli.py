import json
import shutil

import pytest

from benchmark.cli import main
from helpers import stage_args, tiny_params


def _copy(tiny_project, tmp_path):
    root, _ = tiny_project
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    return stage_args(tmp_path)


def test_methods_lists_registered_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("random", "herding", "kcenter", "forgetting"):
        assert name in out


def test_unknown_method_fails_with_choices(tiny_project, caplog):
    _, args = tiny_project
    assert main(["distill", *args, "--method", "nope", "--budget", "10", "--seed", "0"]) == 2
    assert "'nope' is not in params.yaml's grid.methods" in caplog.text and "random" in caplog.text


def test_unknown_dataset_and_preset_fail_clearly(tiny_project, caplog):
    _, args = tiny_project
    assert main(["fetch", *args, "-S", "datasets=[imagenet]"]) == 2
    assert "unknown dataset 'imagenet'" in caplog.text
    assert main(["init-params", "--preset", "nosuch"]) == 2
    assert "unknown preset" in caplog.text
    assert main(["fetch", "--params", "/nonexistent/params.yaml"]) == 2
    assert "mmdd init-params" in caplog.text
    assert main(["fetch", *args, "-S", "eval.studnets=3"]) == 2
    assert "eval.studnets" in caplog.text


def test_budget_over_training_pairs_fails_and_leaves_nothing(tiny_project, tmp_path, caplog):
    args = _copy(tiny_project, tmp_path)
    assert main(["distill", *args, "--method", "random", "--budget", "100000", "--seed", "0"]) == 2
    assert "budget 100000 is not in params.yaml's grid.budgets" in caplog.text
    tiny_params(tmp_path, ["grid.methods=[random]", "grid.budgets=[100000]"])
    assert main(["distill", *args, "--method", "random", "--budget", "100000", "--seed", "0"]) == 2
    assert "exceeds" in caplog.text and "grid.budgets" in caplog.text
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").rglob("distilled*"))


def test_missing_features_name_the_fix(tiny_project, tmp_path, caplog):
    args = _copy(tiny_project, tmp_path)
    shutil.rmtree(tmp_path / "data" / "features")
    assert main(["distill", *args, "--method", "random", "--budget", "10", "--seed", "0"]) == 2
    assert "mmdd embed" in caplog.text


def test_corrupt_expert_file_names_the_fix_and_leaves_no_output(tiny_project, tmp_path, caplog):
    args = _copy(tiny_project, tmp_path)
    expert = next((tmp_path / "data" / "experts").rglob("expert_000.safetensors"))
    expert.write_bytes(b"garbage")
    assert main(["distill", *args, "--method", "herding", "--budget", "10", "--seed", "0"]) == 2
    assert "mmdd experts" in caplog.text
    assert not any((tmp_path / "results").rglob("distilled*")) if (tmp_path / "results").exists() else True


def test_distill_evaluate_report_and_idempotent_rerun(tiny_project, tmp_path, capsys):
    args = _copy(tiny_project, tmp_path)
    cell_args = ["--method", "random", "--method", "forgetting", "--budget", "10", "--seed", "0", "--seed", "1"]
    assert main(["distill", *args, *cell_args]) == 0
    cell = tmp_path / "results" / "cells" / "tiny" / "shapes" / "random" / "b10" / "s0"
    info = json.loads((cell / "distill.volatile.json").read_text())
    assert info["pairs"] == 10 and info["bytes"] > 0 and info["seconds"] > 0
    mtime = (cell / "distilled.safetensors").stat().st_mtime_ns
    assert main(["distill", *args, *cell_args]) == 0
    assert (cell / "distilled.safetensors").stat().st_mtime_ns == mtime
    assert main(["evaluate", *args, *cell_args]) == 0
    metrics = json.loads((cell / "metrics.json").read_text())["protocols"]
    assert set(metrics) == {"strict", "paper"} and len(metrics["strict"]["students"]) == 2
    assert 0 <= metrics["strict"]["r_mean"]["mean"] <= metrics["paper"]["r_mean"]["mean"] <= 100
    # report over a grid restricted to what was run
    rargs = [*args, "-S", "grid.methods=[random,forgetting]", "-S", "grid.budgets=[10]", "-S", "grid.seeds=[0,1]"]
    assert main(["report", *rargs]) == 0
    out = capsys.readouterr().out
    assert "| random" in out and "| forgetting" in out and "±" in out
    table = tmp_path / "results" / "tables" / "tiny" / "shapes.csv"
    assert table.exists() and "r_mean_mean" in table.read_text()


def test_matching_cell_logs_its_curves_to_mlflow_and_the_report(tiny_project, tmp_path):
    from mlflow import MlflowClient

    args = _copy(tiny_project, tmp_path)
    for stage in ("distill", "evaluate"):
        assert main([stage, *args, "--method", "tesla-vl", "--budget", "10", "--seed", "0"]) == 0
    results = tmp_path / "results"
    client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mmdd/tiny/shapes")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    (run,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert (parent.info.run_name, run.info.run_name) == ("tesla-vl/b10", "tesla-vl/b10/s0")
    assert run.data.metrics["cost.distill_sec_per_iter"] > 0 and run.data.metrics["cost.distill_peak_mem_mb"] > 0
    history = client.get_metric_history(run.info.run_id, "distill.match_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # tiny preset: 3 iterations, each logged once
    assert "distill.expert" not in run.data.metrics  # a sampled index, not a measurement
    students = client.get_metric_history(run.info.run_id, "students.test.strict.r_mean")
    assert sorted(m.step for m in students) == [0, 1]  # the tiny preset's 2 evaluation students, as metrics
    mean = sum(m.value for m in students) / 2
    assert run.data.metrics["test.strict.r_mean"] == pytest.approx(mean)
    # the row run: the aggregate over the one seed evaluated so far
    assert parent.data.metrics["test.strict.r_mean"] == pytest.approx(mean, abs=1e-4)  # a summary: 4 decimals
    assert parent.data.metrics["seeds"] == 1
    assert parent.info.status == "FINISHED" and run.info.status == "FINISHED"
    assert main(["report", *args, "-S", "grid.methods=[tesla-vl]", "-S", "grid.budgets=[10]",
                 "-S", "grid.seeds=[0]"]) == 0
    assert (results / "plots" / "tiny" / "shapes_distill_curves.png").exists()
