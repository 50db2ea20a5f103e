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


def test_a_stage_rerun_after_a_code_change_recomputes(tiny_project, tmp_path, monkeypatch, caplog):
    """DVC reruns a stage when the code it runs changes; the stage must then recompute, not find its old output
    "up to date" (its key holds the digest of the same files DVC lists)."""
    import logging

    import benchmark.stages.distill as distill_stage
    import benchmark.stages.evaluate as evaluate_stage

    args = _project(tiny_project, tmp_path)
    assert main(["distill", *args, *ARGS]) == 0 and main(["evaluate", *args, *ARGS]) == 0
    caplog.set_level(logging.INFO)
    caplog.clear()
    assert main(["distill", *args, *ARGS]) == 0
    assert "is up to date" in caplog.text  # same code, same inputs: kept
    metrics = tmp_path / CELL / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert main(["evaluate", *args, *ARGS]) == 0 and metrics.stat().st_mtime_ns == stamp
    edited = distill_stage.code_digest(("benchmark.stages.distill",)) + "-edited"
    monkeypatch.setattr(distill_stage, "code_digest", lambda modules: edited)
    monkeypatch.setattr(evaluate_stage, "code_digest", lambda modules: edited)
    caplog.clear()
    assert main(["distill", *args, *ARGS]) == 0
    assert "is up to date" not in caplog.text and "10 pairs" in caplog.text  # distilled again
    assert main(["evaluate", *args, *ARGS]) == 0 and metrics.stat().st_mtime_ns != stamp


def test_code_digest_follows_the_import_closure(tmp_path):
    from benchmark.stages.code_deps import code_digest

    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg import b  # lazy: the stage still runs it\n    return b.X\n")
    (pkg / "b.py").write_text("X = 1\n")
    (pkg / "c.py").write_text("Y = 1\n")  # not imported by a
    first = code_digest(("pkg.a",), tmp_path)
    (pkg / "c.py").write_text("Y = 2\n")
    assert code_digest(("pkg.a",), tmp_path) == first
    (pkg / "b.py").write_text("X = 2\n")
    assert code_digest(("pkg.a",), tmp_path) != first
