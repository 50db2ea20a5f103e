"""`dvc repro` end to end on a tiny grid, in a temporary copy of the repository (issue: pipeline and tracking)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import copy_repo

BIN = Path(sys.executable).parent
GRID = ["-S", "grid.methods=[random,forgetting,tesla-vl]", "-S", "grid.budgets=[10]", "-S", "grid.seeds=[0,1]"]

pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="dvc not installed in this env")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TQDM_DISABLE"] = "1"
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=1500, check=True, **env):
    res = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def _stages_run(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    dst = copy_repo(tmp_path_factory.mktemp("dvcproj"))
    _run(["git", "init", "-q"], dst)
    _run(["mmdd", "init-params", "--preset", "tiny", *GRID], dst)
    first = _run(["dvc", "repro"], dst)
    return dst, first.stdout


def _mlflow_runs(uri, experiment="mmdd/tiny/shapes"):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing at {uri}"
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_repro_outputs_tables_and_mlflow(project):
    root, out = project
    stages = _stages_run(out)
    for s in ("fetch@shapes", "embed@shapes", "experts@shapes", "distill-random@shapes-10-0",
              "distill-forgetting@shapes-10-1", "distill-tesla-vl@shapes-10-0", "evaluate@shapes-forgetting-10-0",
              "full-data@shapes", "report"):
        assert s in stages
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], root).stdout
    cell = root / "results/cells/tiny/shapes/forgetting/b10/s1"
    for name in ("distilled.safetensors", "distilled.json", "distill_log.jsonl", "metrics.json",
                 "artifacts/images.png", "artifacts/nearest_captions.tsv", "distill.volatile.json"):
        assert (cell / name).exists(), name
    metrics = json.loads((root / "results/metrics/tiny.json").read_text())
    assert set(metrics["shapes"]) == {f"{m}/b10/{p}" for m in ("random", "forgetting", "tesla-vl")
                                      for p in ("strict", "paper")} | {
        f"{ref}/ball/strict" for ref in ("full-data", "full-data (teacher SGD)", "expert @ epoch 2")}  # references
    table = (root / "results/tables/tiny/shapes.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| random") or line.startswith("| forgetting")]
    assert len(rows) == 4 and all(line.count("±") == 7 for line in rows)  # tesla-vl rows start with "| tesla"
    assert table.index("### Strict protocol") < table.index("### Paper protocol")  # one table per protocol
    assert (root / "results/tables/tiny/shapes.tex").exists() and (root / "results/tiny.md").exists()
    assert "(tiny.md)" in (root / "results/README.md").read_text()
    env = json.loads((root / "results/environment/tiny.json").read_text())
    assert env["torch_threads"] == 2 and env["packages"]["torch"] and env["torch_cpu_capability"]
    # MLflow, queried back through the client on the absolute sqlite store inside the project: one experiment for
    # (tiny, shapes); a row run per (method, budget) over its seed runs; a run per reference row
    client, runs = _mlflow_runs(f"sqlite:///{root / 'mlflow.db'}")
    rows = {r.info.run_name: r for r in runs if r.data.tags.get("mmdd.level") == "aggregate"}
    seeds = [r for r in runs if r.data.tags.get("mmdd.level") == "seed"]
    refs = {r.info.run_name for r in runs if r.data.tags.get("mmdd.kind") == "reference"}
    assert set(rows) == {"random/b10", "forgetting/b10", "tesla-vl/b10"} and len(seeds) == 6
    assert refs == {r.split("/")[0] for r in metrics["shapes"] if r.endswith("/ball/strict")}
    assert len(runs) == len(rows) + len(seeds) + len(refs)
    for r in seeds:
        t = r.data.tags
        parent = rows[f"{t['mmdd.method']}/b10"]
        assert t["mlflow.parentRunId"] == parent.info.run_id and t["mmdd.preset"] == "tiny"
        assert t["mlflow.source.git.commit"] and r.info.status == "FINISHED"
        assert 0 <= r.data.metrics["test.strict.r_mean"] <= r.data.metrics["test.paper.r_mean"] <= 100
        assert r.data.metrics["set.pairs"] == 10 and r.data.params["seed"] == t["mmdd.seed"]
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "images.png" in arts and "nearest_captions.tsv" in arts
    for name, row in rows.items():  # the table's value and its interval, from the seed runs' values
        values = sorted(r.data.metrics["test.strict.r_mean"] for r in seeds
                        if r.data.tags["mlflow.parentRunId"] == row.info.run_id)
        summary = metrics["shapes"][f"{name}/strict"]
        assert row.data.metrics["seeds"] == 2 and row.data.params["method"] == name.split("/")[0]
        assert row.data.metrics["test.strict.r_mean"] == pytest.approx(sum(values) / 2, abs=1e-4)  # 4 decimals
        assert row.data.metrics["test.strict.r_mean"] == pytest.approx(summary["r_mean"], abs=1e-3)  # 3 there
        half = 12.706 * abs(values[1] - values[0]) / 2  # t(0.975, 1) * sd / sqrt(2), sd = |a - b| / sqrt(2)
        assert row.data.metrics["test.strict.r_mean.ci95"] == pytest.approx(half, rel=1e-3, abs=1e-4)


def test_second_repro_does_nothing(project):
    root, _ = project
    res = _run(["dvc", "repro"], root)
    assert _stages_run(res.stdout) == []


def test_unknown_method_fails_clearly_and_writes_nothing(project):
    root, _ = project
    before = {name: (root / name).read_text() for name in ("params.yaml", "dvc.yaml")}
    res = _run(["mmdd", "init-params", "--preset", "tiny", "-S", "grid.methods=[random,nope]"], root, check=False)
    assert res.returncode == 2 and "unknown method 'nope'" in res.stdout + res.stderr
    assert {name: (root / name).read_text() for name in before} == before


def _status(root) -> set[str]:
    """Stages `dvc status` reports as changed."""
    out = _run(["dvc", "status"], root).stdout
    return {line[:-1] for line in out.splitlines() if line.endswith(":") and not line.startswith((" ", "\t"))}


@pytest.mark.parametrize("path, edit, stale", [
    ("methods/coresets/forgetting.py", ("defaults", "defaults"),  # a new default in the method's own module
     {"distill-forgetting@shapes-10-0", "distill-forgetting@shapes-10-1"}),
    ("methods/matching/engine.py", ("DTYPES = {", "DTYPES = {  # edited"),
     {"distill-tesla-vl@shapes-10-0", "distill-tesla-vl@shapes-10-1"}),
])
def test_editing_code_marks_exactly_the_cells_that_run_it_stale(project, path, edit, stale):
    root, _ = project
    src = root / path
    saved = src.read_text()
    try:
        if path.endswith("forgetting.py"):
            src.write_text(saved + '\nForgettingCoreset.defaults = {"*": {"lr_img": 0.2, "lr_txt": 0.1}}\n')
        else:
            assert edit[0] in saved
            src.write_text(saved.replace(edit[0], edit[1], 1))
        assert _status(root) == stale
    finally:
        src.write_text(saved)
    assert _status(root) == set()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_server(project):
    root, _ = project
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(root / "mlartifacts-server")],
                            cwd=root, env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(120):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not start")
    yield uri
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_param_change_reruns_only_that_method_and_survives_interruption(project, mlflow_server):
    root, _ = project
    import yaml

    params = root / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    old_lr = doc["methods"]["forgetting"]["shapes"]["b10"]["lr_img"]
    doc["methods"]["forgetting"]["shapes"]["b10"]["lr_img"] = 0.05
    params.write_text(yaml.safe_dump(doc, sort_keys=False))
    # Interrupt the rerun in the middle of the grid, then rerun: it must finish without manual clean-up.
    proc = subprocess.Popen(["dvc", "repro"], cwd=root, env=_env(MLFLOW_TRACKING_URI=mlflow_server),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("Running stage 'evaluate@shapes-forgetting-10-0'"):
            time.sleep(2.0)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    first = _stages_run("".join(seen))
    assert first and all("random" not in s and "tesla" not in s for s in first)
    res = _run(["dvc", "repro"], root, MLFLOW_TRACKING_URI=mlflow_server)
    rerun = _stages_run(res.stdout)
    assert "report" in rerun and "evaluate@shapes-forgetting-10-1" in rerun
    assert all("random" not in s and "tesla" not in s for s in rerun) and "full-data@shapes" not in rerun
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], root).stdout
    info = json.loads((root / "results/cells/tiny/shapes/forgetting/b10/s0/distilled.json").read_text())
    assert info["meta"]["params"]["lr_img"] == 0.05
    # The new runs went through the real MLflow server; the old ones are in the same store.
    # A changed configuration is a new table row: forgetting has its old row (lr_img as before) and a new one
    # (lr_img 0.05), each with its two seeds; random's row was left alone.
    _, runs = _mlflow_runs(mlflow_server)
    rows, seeds = {}, {}
    for r in runs:
        if r.info.status == "FINISHED" and r.data.tags.get("mmdd.level") in ("aggregate", "seed"):
            by = rows if r.data.tags["mmdd.level"] == "aggregate" else seeds
            by.setdefault(r.data.tags["mmdd.method"], []).append(r)
    assert len(rows["random"]) == 1 and len(seeds["random"]) == 2
    assert sorted(r.data.params["hp.lr_img"] for r in rows["forgetting"]) == sorted(
        [str(doc["methods"]["forgetting"]["shapes"]["b10"]["lr_img"]), str(old_lr)])
    assert len(seeds["forgetting"]) == 4
    for row in rows["forgetting"]:
        children = [r for r in seeds["forgetting"] if r.data.tags["mlflow.parentRunId"] == row.info.run_id]
        assert sorted(r.data.tags["mmdd.seed"] for r in children) == ["0", "1"] and row.data.metrics["seeds"] == 2
    assert all(r.info.status != "RUNNING" for r in runs)


def test_experiment_in_a_temporary_copy_reruns_only_the_cells_whose_inputs_changed(project):
    """Every output a later stage needs is cached, so DVC's temporary copy of an experiment restores the rest.

    ``--temp`` makes the same temporary copy a queued experiment gets, without the Celery queue worker, which can
    hang after its last experiment (treeverse/dvc#10428: a JSONDecodeError in its monitor thread; it hung this test
    once for its full timeout)."""
    root, _ = project
    _run(["git", "add", "-A"], root)
    _run(["git", "-c", "user.email=ci@example.invalid", "-c", "user.name=ci", "commit", "-qm", "baseline"], root)
    res = _run(["dvc", "exp", "run", "--temp", "-S", "methods.random.shapes.b10.lr_img=0.05"], root, timeout=900)
    ran = _stages_run(res.stdout)
    assert sorted(ran) == ["distill-random@shapes-10-0", "distill-random@shapes-10-1", "evaluate@shapes-random-10-0",
                           "evaluate@shapes-random-10-1", "report"], res.stdout[-3000:]
    assert "Stage 'distill-forgetting@shapes-10-0' didn't change, skipping" in res.stdout
