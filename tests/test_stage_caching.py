"""Content-addressed caching: a stage is up to date only when its outputs exist and were computed from the bytes it
would read now (issue: trust)."""

import json
import os
import shutil
import stat

import torch

from benchmark.cli import main
from benchmark.distilled import DistilledSet
from helpers import stage_args

CELL = "results/cells/tiny/shapes/random/b10/s0"
ARGS = ["--method", "random", "--budget", "10", "--seed", "0"]


def _project(tiny_project, tmp_path):
    root, _ = tiny_project
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    return [*stage_args(tmp_path), "-S", "tracking.enabled=false"]


def _r_mean(tmp_path):
    return json.loads((tmp_path / CELL / "metrics.json").read_text())["protocols"]["strict"]["r_mean"]["mean"]


def test_evaluate_keys_on_the_sets_bytes_not_only_its_json(tiny_project, tmp_path):
    args = _project(tiny_project, tmp_path)
    assert main(["distill", *args, *ARGS]) == 0 and main(["evaluate", *args, *ARGS]) == 0
    first = _r_mean(tmp_path)
    cell = tmp_path / CELL
    # another valid set of the same shape, written over the tensors only (distilled.json untouched)
    dset = DistilledSet.load(cell / "distilled")
    json_bytes = (cell / "distilled.json").read_bytes()
    dset.phases[0].images = torch.flip(dset.phases[0].images, dims=[0])
    dset.save(cell / "swapped")
    os.replace(cell / "swapped.safetensors", cell / "distilled.safetensors")
    assert (cell / "distilled.json").read_bytes() == json_bytes
    assert main(["evaluate", *args, *ARGS]) == 0
    assert _r_mean(tmp_path) != first  # re-evaluated on the new tensors, not the cached metrics
    # and the distill stage sees that the tensors are not the ones it recorded: it recomputes the set
    assert main(["distill", *args, *ARGS]) == 0
    assert torch.equal(DistilledSet.load(cell / "distilled").phases[0].images, torch.flip(dset.phases[0].images, [0]))


def test_a_deleted_output_makes_the_stage_run_again(tiny_project, tmp_path):
    args = _project(tiny_project, tmp_path)
    assert main(["distill", *args, *ARGS]) == 0
    cell = tmp_path / CELL
    before = (cell / "distilled.safetensors").read_bytes()
    for name in ("distilled.safetensors", "distill_log.jsonl"):
        (cell / name).unlink()
        assert main(["distill", *args, *ARGS]) == 0
        assert (cell / "distilled.safetensors").read_bytes() == before and (cell / name).exists()
    assert main(["evaluate", *args, *ARGS]) == 0
    (cell / "metrics.json").unlink()
    assert main(["evaluate", *args, *ARGS]) == 0 and (cell / "metrics.json").exists()


def test_result_files_have_the_umasks_ordinary_mode(tiny_project, tmp_path):
    args = _project(tiny_project, tmp_path)
    old = os.umask(0o022)
    try:
        assert main(["distill", *args, *ARGS]) == 0
    finally:
        os.umask(old)
    for name in ("distilled.safetensors", "distilled.json", "distill.volatile.json"):
        assert stat.S_IMODE((tmp_path / CELL / name).stat().st_mode) == 0o644, name


def test_a_stage_refuses_data_generated_under_another_configuration(tiny_project, tmp_path, caplog):
    args = _project(tiny_project, tmp_path)
    assert main(["distill", *args, *ARGS, "-S", "data.shapes.n_train=200"]) == 2
    assert "generated under another configuration" in caplog.text and "n_train" in caplog.text
    assert not (tmp_path / CELL / "distilled.safetensors").exists()


def test_a_tracking_failure_never_loses_the_computed_metrics(tiny_project, tmp_path, monkeypatch, caplog):
    root, _ = tiny_project
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    args = stage_args(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    dead = ["-S", "tracking.uri=http://127.0.0.1:9"]  # nothing listens on the discard port
    assert main(["distill", *args, *ARGS]) == 0
    assert main(["evaluate", *args, *dead, *ARGS]) == 0
    assert "MLflow tracking failed" in caplog.text
    metrics = json.loads((tmp_path / CELL / "metrics.json").read_text())
    assert metrics["protocols"]["strict"]["r_mean"]["mean"] >= 0
    assert json.loads((tmp_path / CELL / "evaluate.volatile.json").read_text())["mlflow_run_id"] is None
