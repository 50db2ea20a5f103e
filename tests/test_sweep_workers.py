"""Persistent sweep workers and the in-process DVC ledger (issue #11): the tiny pipeline gives bitwise the same
recorded outputs with per-task subprocesses and with two workers; a task that kills its worker is a failed attempt,
the worker is replaced and the retry succeeds; the ledger writes ``dvc.lock`` exactly as ``dvc commit`` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmark.sweep.workers import mmdd_argv
from tests.helpers import copy_repo

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
GRID = ["-S", "grid.methods=[random,tesla-vl]", "-S", "grid.budgets=[10]", "-S", "grid.seeds=[0]"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), extra.pop("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _sweep(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "benchmark.sweep", *args], root, **env)


def _summary(root: Path) -> dict:
    return json.loads((root / "results/logs/sweep.json").read_text())


def _lock_outs(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Every stage's recorded outputs (path, md5) in dvc.lock."""
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {name: sorted((o["path"], o["md5"]) for o in s.get("outs", [])) for name, s in stages.items()}


def test_mmdd_argv_runs_only_plain_mmdd_commands_in_process():
    assert mmdd_argv("mmdd evaluate --method lors --budget 10 --no-progress") == [
        "evaluate", "--method", "lors", "--budget", "10", "--no-progress"]
    assert mmdd_argv("/opt/venv/bin/mmdd report --params 'my params.yaml'") == ["report", "--params", "my params.yaml"]
    for cmd in ("echo a > a.txt", "mmdd fetch && mmdd embed", "mmdd fetch; rm -rf x", "mmdd fetch | tee log",
                "mmdd fetch --data-root $HOME/data", "mmdd fetch -S 'grid.methods=[a,b]'", "FOO=1 mmdd fetch",
                "mmdd", "python -m benchmark.cli fetch", "mmdd fetch 'unbalanced"):
        assert mmdd_argv(cmd) is None, cmd


@pytest.fixture(scope="module")
def twin_projects(tmp_path_factory):
    """The same tiny grid swept twice from nothing: per-task subprocesses, then two persistent workers."""
    base = tmp_path_factory.mktemp("twins")
    roots = {}
    for mode in ("subprocess", "worker"):
        root = copy_repo(base / mode)
        assert _run(["git", "init", "-q"], root).returncode == 0
        res = _run([str(BIN / "mmdd"), "init-params", "--preset", "tiny", *GRID], root)
        assert res.returncode == 0, res.stderr
        res = _sweep(root, "-j", "2", "--tasks", mode)
        assert res.returncode == 0, res.stderr[-5000:]
        roots[mode] = root
    return roots


def test_workers_record_bitwise_the_same_outputs_as_subprocesses(twin_projects):
    sub, work = twin_projects["subprocess"], twin_projects["worker"]
    ran = set(_summary(sub)["stages"])  # dvc.lock, copied from the repository, also holds the default grid's entries
    assert len(ran) == 9 and ran == set(_summary(work)["stages"])
    outs = {name: files for name, files in _lock_outs(sub).items() if name in ran}
    assert outs == {name: files for name, files in _lock_outs(work).items() if name in ran}
    assert set(outs) == ran and all(outs.values())
    metrics = sorted(p.relative_to(sub) for p in (sub / "results").rglob("metrics.json"))
    assert len(metrics) == 3  # two cells and full-data
    for rel in [*metrics, Path("results/metrics/tiny.json")]:
        assert (sub / rel).read_bytes() == (work / rel).read_bytes(), rel
    for root in (sub, work):
        assert _run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout.strip() == "{}"


def test_workers_ran_the_stages_in_process_and_logged_like_subprocesses(twin_projects):
    sub, work = twin_projects["subprocess"], twin_projects["worker"]
    summary = _summary(work)
    attempts = [a for s in summary["stages"].values() for t in s["tasks"] for a in t["attempts"]]
    assert {a["mode"] for a in attempts} == {"worker"}
    assert len({a["pid"] for a in attempts}) == 2  # the two workers, each running several stages
    assert summary["timing"]["workers_started"] == 2 and summary["timing"]["worker_start_s"] > 0
    assert {a["mode"] for s in _summary(sub)["stages"].values() for t in s["tasks"] for a in t["attempts"]} == {
        "subprocess"}
    for root in (sub, work):  # the stage's own log records reach the task's log in both modes
        text = (root / "results/logs/evaluate@shapes-tesla-vl-10-0.log").read_text()
        assert "INFO mmdd: shapes/tesla-vl/b10/s0 strict: r_mean" in text and "=== exit 0 after" in text
    t = summary["timing"]
    assert t["wall_s"] > 0 and t["dvc_s"] > 0 and 0 < t["overhead_fraction"] < 1


def test_second_sweep_dry_run_says_nothing_to_do(twin_projects):
    res = _sweep(twin_projects["worker"], "--dry-run")
    assert res.returncode == 0 and "nothing to do" in res.stderr, res.stderr


# A plug-in that kills the process importing it the first time (a marker file remembers), the way a crashing
# native extension or a method calling os._exit would take down a worker mid-task.
PLUGIN = '''
import os, signal
from pathlib import Path

from benchmark.interface import Method

marker = Path(os.environ["CRASHY_MARKER"])
if not marker.exists():
    marker.write_text("crashed once")
    {crash}


class Crashy(Method):
    pass
'''
TOY = {"stages": {
    "params": {"cmd": "mmdd init-params --preset tiny --out gen/params.yaml --no-dvc-yaml",
               "outs": ["gen/params.yaml"]},
    "shell": {"cmd": "cp gen/params.yaml copy.yaml", "deps": ["gen/params.yaml"], "outs": ["copy.yaml"]},
    "again": {"cmd": "mmdd init-params --preset tiny --out gen2/params.yaml --no-dvc-yaml", "deps": ["copy.yaml"],
              "outs": ["gen2/params.yaml"]},
}}


@pytest.mark.parametrize("crash, death", [("os.kill(os.getpid(), signal.SIGKILL)", "killed by signal SIGKILL"),
                                          ("os._exit(7)", "exit status 7")])
def test_task_that_kills_its_worker_fails_that_attempt_and_the_retry_runs_in_a_new_worker(tmp_path, crash, death):
    plugin = tmp_path / "plugin"
    (plugin / "crashy-0.1.dist-info").mkdir(parents=True)
    (plugin / "crashy-0.1.dist-info/METADATA").write_text("Metadata-Version: 2.1\nName: crashy\nVersion: 0.1\n")
    (plugin / "crashy-0.1.dist-info/entry_points.txt").write_text("[mmdd.methods]\ncrashy = crashy:Crashy\n")
    (plugin / "crashy.py").write_text(PLUGIN.format(crash=crash))
    root = tmp_path / "toy"
    root.mkdir()
    assert _run(["git", "init", "-q"], root).returncode == 0
    assert _run([sys.executable, "-m", "dvc", "init", "-q"], root).returncode == 0
    (root / "dvc.yaml").write_text(yaml.safe_dump(TOY, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    res = _sweep(root, "--retries", "1", PYTHONPATH=str(plugin), CRASHY_MARKER=str(tmp_path / "marker"))
    assert res.returncode == 0, res.stderr[-5000:]
    stages = _summary(root)["stages"]
    first, retry = stages["params"]["tasks"][0]["attempts"]
    assert not first["ok"] and f"died while running the task ({death})" in first["error"]
    assert retry["ok"] and retry["mode"] == "worker" and retry["pid"] != first["pid"]
    assert stages["shell"]["tasks"][0]["attempts"][0]["mode"] == "subprocess"
    again = stages["again"]["tasks"][0]["attempts"]
    assert [a["ok"] for a in again] == [True] and again[0]["pid"] == retry["pid"]  # the replacement carries on
    log = (root / "results/logs/params.log").read_text()
    assert log.count("=== mmdd sweep | params | attempt") == 2 and death in log
    assert yaml.safe_load((root / "gen/params.yaml").read_text())["preset"] == "tiny"
    assert _run([sys.executable, "-m", "dvc", "status", "--json"], root).stdout.strip() == "{}"


def test_ledger_writes_dvc_lock_byte_for_byte_as_dvc_commit(tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    assert _run(["git", "init", "-q"], root).returncode == 0
    assert _run([sys.executable, "-m", "dvc", "init", "-q"], root).returncode == 0
    stages = {f"s{k}": {"cmd": f"echo {k} > out{k}.txt", "outs": [f"out{k}.txt"]} for k in range(3)}
    stages["long"] = {"cmd": "echo 'a command long enough that the YAML dumper folds it over two lines' > long.txt "
                             "&& true", "deps": ["out0.txt"], "outs": ["long.txt"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    assert _sweep(root, "-j", "2").returncode == 0
    ours = (root / "dvc.lock").read_text()
    order = list(yaml.safe_load(ours)["stages"])
    assert set(order) == set(stages)
    (root / "out1.txt").write_text("changed\n")  # one stage re-recorded by the ledger, in place
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {**stages, "s1": {
        "cmd": "echo changed > out1.txt", "outs": ["out1.txt"]}}}, sort_keys=False))
    assert _sweep(root).returncode == 0
    ours = (root / "dvc.lock").read_text()
    assert list(yaml.safe_load(ours)["stages"]) == order  # s1's entry replaced where it was
    res = _run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet"], root)  # DVC rewrites every entry
    assert res.returncode == 0, res.stderr
    assert (root / "dvc.lock").read_text() == ours
