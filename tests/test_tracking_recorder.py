"""The MLflow record: live distillation curves, run status on failure and Ctrl-C, the row aggregate's statistics,
the ranking view stored on the experiment, and the catch-up of results computed with tracking off."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from benchmark.stages.cells import Cell
from benchmark.tracking import layout as L
from helpers import tiny_context


@pytest.fixture()
def recorder(tmp_path):
    from benchmark.tracking.recorder import Recorder

    (tmp_path / ".git").mkdir()  # the project root of the store
    ctx = tiny_context(tmp_path, results=tmp_path / "results")
    return Recorder(ctx, uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def _append(path, *records):
    with open(path, "a") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")


def _history(rec, run_id, name):
    return sorted((m.step, m.value) for m in rec.client.get_metric_history(run_id, name))


def test_log_follower_logs_lines_while_the_method_runs_and_skips_an_earlier_runs_log(recorder, tmp_path):
    from benchmark.tracking.recorder import LogFollower

    log_path = tmp_path / "distill_log.jsonl"
    _append(log_path, {"step": 1, "match_loss": 9.0})  # left by an earlier run of the cell
    run = recorder.client.create_run(recorder.tracker.experiment_id("live"))
    rid = run.info.run_id
    with LogFollower(recorder.tracker, rid, [log_path], interval_s=0.05):
        tmp = log_path.with_suffix(".tmp")  # the method starts: JsonlLogger.truncate replaces the file
        tmp.write_text("")
        os.replace(tmp, log_path)
        _append(log_path, {"step": 1, "match_loss": 2.0, "expert": 3.0}, {"step": 2, "match_loss": 1.5})
        deadline = time.monotonic() + 20
        while len(_history(recorder, rid, "distill.match_loss")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _history(recorder, rid, "distill.match_loss") == [(1, 2.0), (2, 1.5)]  # live, before the end
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": 3, "match_loss": 1.25}) + "\n" + '{"step": 4, "match')  # a line in flight
    assert _history(recorder, rid, "distill.match_loss") == [(1, 2.0), (2, 1.5), (3, 1.25)]
    assert recorder.client.get_metric_history(rid, "distill.expert") == []  # a sampled index is not charted


@pytest.mark.parametrize("error, status", [(RuntimeError("method crashed"), "FAILED"),
                                           (KeyboardInterrupt(), "KILLED"), (None, "FINISHED")])
def test_a_seed_run_is_open_while_distilling_and_closed_with_what_happened(recorder, error, status):
    cell = Cell("shapes", "random", 10, 0)
    recorder.ctx.cell_dir(cell).mkdir(parents=True)

    def distil():
        with recorder.distilling(cell, interval_s=0.05) as rid:
            assert recorder.client.get_run(rid).info.status == "RUNNING"
            parent = recorder.client.get_run(rid).data.tags["mlflow.parentRunId"]
            assert recorder.client.get_run(parent).info.status == "RUNNING"
            time.sleep(0.05)
            if error is not None:
                raise error
        return rid

    if error is None:
        rid = distil()
    else:
        with pytest.raises(type(error)):
            distil()
        (run,) = recorder._seed_runs(cell)
        rid = run.info.run_id
    run = recorder.client.get_run(rid)
    assert run.info.status == status and run.info.end_time > run.info.start_time
    assert run.info.run_name == "random/b10/s0" and run.data.tags["mmdd.seed"] == "0"
    parent = recorder.client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "random/b10"
    exp = recorder.client.get_experiment(run.info.experiment_id)
    assert exp.name == "mmdd/tiny/shapes" and "parent run per table row" in exp.tags["mlflow.note.content"]


def test_row_aggregate_is_the_mean_and_t_interval_over_seeds():
    agg = L.aggregate_metrics({0: {"test.strict.r_mean": 1.0, "test.strict.r_mean.std": 0.5},
                               1: {"test.strict.r_mean": 2.0}, 2: {"test.strict.r_mean": 3.0}})
    assert agg["seeds"] == 3 and agg["test.strict.r_mean"] == pytest.approx(2.0)
    assert agg["test.strict.r_mean.std"] == pytest.approx(1.0)  # over seeds, not the students' std
    assert agg["test.strict.r_mean.ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    one = L.aggregate_metrics({4: {"test.paper.r_mean": 7.0}})
    assert one == {"seeds": 1.0, "test.paper.r_mean": 7.0}  # no interval from a single seed


def test_every_experiment_gets_the_ranking_view_mmdd_ui_opens(recorder):
    from benchmark.tracking.store import prepare_views

    exp_id = recorder.experiment("shapes")
    recorder.tracker.experiment_id("unrelated")
    assert prepare_views(recorder.tracker, "mmdd") == [("mmdd/tiny/shapes", exp_id)]
    tags = recorder.client.get_experiment(exp_id).tags
    ranking = json.loads(tags[L.VIEW_TAG_PREFIX + L.VIEW_KEY])
    assert ranking["orderByKey"] == "metrics.`test.strict.r_mean`" and ranking["orderByAsc"] is False
    assert {"params.`method`", "params.`budget`", "metrics.`test.strict.r_mean`",
            "metrics.`test.strict.r_mean.ci95`"} <= set(ranking["selectedColumns"])
    assert ranking["searchFilter"] == "tags.`mmdd.level` != 'seed'"  # one row per table row
    seeds = json.loads(tags[L.VIEW_TAG_PREFIX + L.SEEDS_VIEW_KEY])
    assert {"params.`method`", "params.`budget`", "params.`seed`"} <= set(seeds["selectedColumns"])
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert L.landing_url("http://h:1", exp_id) == f"http://h:1/#/experiments/{exp_id}/runs?viewStateShareKey=mmdd-ranking"


def test_record_catches_up_on_results_computed_with_tracking_off(tiny_project, tmp_path):
    from mlflow import MlflowClient

    from benchmark.cli import main
    from helpers import stage_args

    root, _ = tiny_project
    (tmp_path / "results").mkdir()
    args = [*stage_args(root, results=tmp_path / "results"), "--method", "random", "--budget", "10"]
    off = ["-S", "tracking.enabled=false"]
    assert main(["distill", *args, *off]) == 0 and main(["evaluate", *args, *off]) == 0
    assert not (tmp_path / "results" / "mlflow.db").exists()
    full = [*stage_args(root, results=tmp_path / "results"), *off]
    assert main(["full-data", *full]) == 0
    args_all = [*stage_args(root, results=tmp_path / "results"), "-S", "grid.methods=[random]",
                "-S", "grid.budgets=[10]"]
    assert main(["record", *args_all]) == 0
    assert main(["record", *args_all]) == 0  # idempotent: nothing recorded twice
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mmdd/tiny/shapes")
    runs = client.search_runs([exp.experiment_id])
    seeds = [r for r in runs if r.data.tags.get("mmdd.level") == "seed"]
    (row,) = [r for r in runs if r.data.tags.get("mmdd.level") == "aggregate"]
    assert sorted(r.info.run_name for r in seeds) == ["random/b10/s0", "random/b10/s1"]
    assert row.data.metrics["seeds"] == 2 and row.data.metrics["test.strict.r_mean.ci95"] >= 0
    assert {r.data.tags["mmdd.kind"] for r in runs} == {"method", "reference"}
    refs = [r for r in runs if r.data.tags["mmdd.kind"] == "reference"]
    assert "full-data" in {r.info.run_name for r in refs}
    assert all(r.data.metrics["test.strict.r_mean"] > 0 for r in refs)


def test_two_processes_creating_one_row_converge_on_the_first(recorder):
    """Two workers starting seeds of one row at once may each create its row run: every later call keeps the
    earlier one, moves the other's seed runs to it and removes it."""
    from benchmark.tracking.recorder import CREATED_TAG

    cell = Cell("shapes", "random", 10, 0)
    exp, key = recorder.experiment("shapes"), recorder.group(cell)
    rows = [recorder.client.create_run(exp, run_name="random/b10", tags={L.KEY: key, L.LEVEL: L.AGGREGATE,
                                                                        CREATED_TAG: str(ns)})
            for ns in (2000, 1000)]  # the second was created first
    child = recorder.client.create_run(exp, tags={L.PARENT_TAG: rows[0].info.run_id, L.LEVEL: L.SEED,
                                                  "mmdd.seed": "1"})
    assert recorder.parent(cell) == rows[1].info.run_id
    assert recorder.client.get_run(child.info.run_id).data.tags[L.PARENT_TAG] == rows[1].info.run_id
    assert recorder.client.get_run(rows[0].info.run_id).info.lifecycle_stage == "deleted"
    assert [r.info.run_id for r in recorder._find(exp, key)] == [rows[1].info.run_id]


def test_cross_architecture_results_are_logged_per_tower_and_aggregated_on_the_row(tiny_project, tmp_path):
    """``mmdd cross-arch`` logs ``cross_arch.<tower>.test.*`` on the seed run; the row aggregates them over seeds
    (mean, t half-width, ``cross_arch.seeds``) and the experiment gets the ``mmdd-cross-arch`` chart view."""
    from mlflow import MlflowClient

    from benchmark.cli import main
    from helpers import stage_args

    root, _ = tiny_project
    (tmp_path / "results").mkdir()
    base = [*stage_args(root, results=tmp_path / "results"), "--method", "random", "--budget", "10",
            "-S", "cross_arch.towers=[convnet_w64_d4]", "-S", "cross_arch.students=1"]
    assert main(["distill", *base]) == 0 and main(["cross-arch", *base]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mmdd/tiny/shapes")
    runs = client.search_runs([exp.experiment_id])
    seeds = {r.data.tags["mmdd.seed"]: r for r in runs if r.data.tags.get("mmdd.level") == "seed"}
    (row,) = [r for r in runs if r.data.tags.get("mmdd.level") == "aggregate"]
    name = "cross_arch.convnet_w64_d4.test.strict.r_mean"
    values = []
    for seed, run in sorted(seeds.items()):
        on_disk = json.loads((tmp_path / "results" / "cells" / "tiny" / "shapes" / "random" / "b10" / f"s{seed}"
                              / "cross_arch.json").read_text())
        expected = on_disk["towers"]["convnet_w64_d4"]["protocols"]["strict"]["r_mean"]["mean"]
        assert run.data.metrics[name] == pytest.approx(expected)
        values.append(expected)
    assert len(values) == 2 and row.data.metrics["cross_arch.seeds"] == 2
    assert row.data.metrics[name] == pytest.approx(sum(values) / 2, abs=1e-4)
    assert row.data.metrics[f"{name}.ci95"] == pytest.approx(12.706205 * abs(values[0] - values[1]) / 2, abs=1e-3)
    view = json.loads(exp.tags["mlflow.sharedViewState.mmdd-cross-arch"])
    assert f"metrics.`{name}`" in view["selectedColumns"]
    assert main(["record", *stage_args(root, results=tmp_path / "results"), "-S", "grid.methods=[random]",
                 "-S", "grid.budgets=[10]", "-S", "cross_arch.towers=[convnet_w64_d4]"]) == 0
    again = client.get_run(row.info.run_id).data.metrics
    assert again[name] == row.data.metrics[name] and again["cross_arch.seeds"] == 2  # nothing logged twice
