"""``mmdd sweep`` (issue #7): the DVC grid as tasks on a real local Ray cluster, DVC and MLflow still the record.

Part 1 drives a small shell-command pipeline with the local runner (fast): dependency order, retries, failure
reporting, blocked stages, ``dvc repro``-like re-checks, ``dvc commit``. Part 2 starts a real Ray cluster on
127.0.0.1 (a head and a second worker node, each its own ``ray start`` process tree) and a real ``mlflow server``,
and runs the tiny grid through ``--runner ray``: each cell once, a failing cell retried then reported, a worker node
killed mid-run, and a second sweep that completes only what is missing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from benchmark.sweep.cell import remove_partials
from benchmark.sweep.stages import Stage, levels, partial_globs, select, tasks_for
from tests.helpers import copy_repo

BIN = Path(sys.executable).parent
GRID = ["-S", "grid.methods=[random,forgetting]", "-S", "grid.budgets=[10]", "-S", "grid.seeds=[0,1]"]
HEADER = re.compile(r"^=== mmdd sweep \| (\S+) \| attempt (\d+) \| host \S+ \| node (\S+) \| pid (\d+) \|", re.M)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TQDM_DISABLE"] = "1"
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _sweep(root: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "benchmark.sweep", *args], root, **env)


def _summary(root: Path) -> dict:
    return json.loads((root / "results/logs/sweep.json").read_text())["stages"]


def _by_status(stages: dict, status: str) -> set[str]:
    return {n for n, s in stages.items() if s["status"] == status}


def _attempts(stage: dict) -> list[int]:
    return [len(t["attempts"]) for t in stage["tasks"]]


def _dvc_stale(root: Path) -> set[str]:
    res = _run([sys.executable, "-m", "dvc", "status", "--json"], root)
    assert res.returncode == 0, res.stderr
    return set(json.loads(res.stdout or "{}"))


# ====================================================================== part 1: the driver, local runner

def test_levels_select_and_expert_tasks(tmp_path):
    def stage(name, *up, cmd="true"):
        return Stage(name, cmd, ".", tuple(up), (f"out/{name}",))

    pipe = {s.name: s for s in (stage("fetch@a"), stage("embed@a", "fetch@a"),
                                stage("experts@a", "fetch@a", "embed@a", cmd="mmdd experts --dataset a"),
                                stage("distill-x@a-1", "embed@a", "experts@a"), stage("report", "distill-x@a-1"))}
    assert levels(pipe) == [["fetch@a"], ["embed@a"], ["experts@a"], ["distill-x@a-1"], ["report"]]
    assert select(pipe, ["distill-x"]) == {"fetch@a", "embed@a", "experts@a", "distill-x@a-1"}
    with pytest.raises(RuntimeError, match="unknown stage 'nope'"):
        select(pipe, ["nope"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"experts": {"num_experts": 3}}))
    tasks = tasks_for(pipe["experts@a"], tmp_path, "results/logs")
    assert [t.cmd for t in tasks] == [f"mmdd experts --dataset a --index {k}" for k in range(3)]
    assert len({t.log for t in tasks}) == 3 and all(t.wants_gpu for t in tasks)
    assert not tasks_for(pipe["report"], tmp_path, "results/logs")[0].wants_gpu


def test_parallel_jobs_get_a_share_of_the_cores_and_passive_openmp_waits(tmp_path, monkeypatch):
    from benchmark.sweep.executors import LocalExecutor, parallel_env

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert parallel_env(1, {}) == {}
    assert parallel_env(4, {}) == {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}
    assert parallel_env(3, {"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_NUM_THREADS": "2"}  # what the user set stays
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    ex = LocalExecutor(str(tmp_path), {"MMDD_X": "1"}, jobs=2, tasks="subprocess")
    try:
        assert ex.env == {"MMDD_X": "1", "OMP_NUM_THREADS": "4"}  # the shell's OMP_WAIT_POLICY reaches the tasks
    finally:
        ex.close()
    ex = LocalExecutor(str(tmp_path), {}, jobs=1, tasks="subprocess")
    try:
        assert ex.env == {}
    finally:
        ex.close()


def test_remove_partials_only_touches_this_tasks_temp_files(tmp_path):
    d = tmp_path / "data/experts/ds/tower"
    d.mkdir(parents=True)
    names = [".expert_001.safetensors.x1.tmp", ".expert_002.json.x2.tmp", "expert_001.safetensors"]
    for n in names:
        (d / n).write_text("x")
    (tmp_path / "results").mkdir()
    (tmp_path / "results/.metrics.json.ab.tmp").write_text("{")
    assert remove_partials(tmp_path, partial_globs(("data/experts/ds",), ".expert_001.*")) == [d / names[0]]
    assert (d / names[1]).exists() and (d / names[2]).exists()
    removed = remove_partials(tmp_path, partial_globs(("data/experts/ds", "results/metrics.json")))
    assert set(removed) == {d / names[1], tmp_path / "results/.metrics.json.ab.tmp"} and (d / names[2]).exists()


TOY = {"stages": {
    "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
    "b": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    "flaky": {"cmd": "test -f .flaky-ran || { touch .flaky-ran; echo 'flaky: first attempt fails' >&2; exit 1; }; "
                     "echo ok > flaky.txt", "outs": ["flaky.txt"]},
    "broken": {"cmd": "echo 'boom: broken on purpose' >&2; exit 3", "outs": ["broken.txt"]},
    "after-broken": {"cmd": "cp broken.txt after.txt", "deps": ["broken.txt"], "outs": ["after.txt"]},
}}


@pytest.fixture()
def toy(tmp_path):
    root = tmp_path / "toy"
    root.mkdir()
    assert _run(["git", "init", "-q"], root).returncode == 0
    assert _run([sys.executable, "-m", "dvc", "init", "-q"], root).returncode == 0
    (root / "dvc.yaml").write_text(yaml.safe_dump(TOY, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    return root


def test_local_sweep_retries_reports_blocks_and_commits(toy):
    (toy / ".a.txt.x1.tmp").write_text("half")  # left by an interrupted atomic write of a.txt: removed before a runs
    res = _sweep(toy, "--jobs", "2", "--retries", "1")
    assert res.returncode == 1, res.stderr
    stages = _summary(toy)
    assert _by_status(stages, "done") == {"a", "b", "flaky"}
    assert _attempts(stages["a"]) == [1] and _attempts(stages["b"]) == [1]
    assert not (toy / ".a.txt.x1.tmp").exists() and "removed" in res.stderr
    assert _attempts(stages["flaky"]) == [2]  # failed once, then succeeded on the retry
    assert stages["broken"]["status"] == "failed" and _attempts(stages["broken"]) == [2]
    assert "boom: broken on purpose" in stages["broken"]["error"]
    assert stages["after-broken"]["status"] == "blocked"
    # the final summary names the failed stage, its error and its log
    assert re.search(r"failed +broken \(2 attempt\(s\)\): boom: broken on purpose; log: results/logs/broken\.log",
                     res.stderr)
    assert len(HEADER.findall((toy / "results/logs/broken.log").read_text())) == 2
    assert _dvc_stale(toy) == {"broken", "after-broken"}  # finished stages are committed
    # fix the broken stage: the next sweep runs only what is missing
    doc = yaml.safe_load((toy / "dvc.yaml").read_text())
    doc["stages"]["broken"]["cmd"] = "echo fixed > broken.txt"
    (toy / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    res = _sweep(toy, "--jobs", "2")
    assert res.returncode == 0, res.stderr
    stages = _summary(toy)
    assert _by_status(stages, "done") == {"broken", "after-broken"}
    assert _by_status(stages, "up-to-date") == {"a", "b", "flaky"}
    assert _dvc_stale(toy) == set()
    assert (toy / "after.txt").read_text() == "fixed\n"


def test_local_sweep_reruns_downstream_only_when_dvc_says_it_changed(toy):
    doc = yaml.safe_load((toy / "dvc.yaml").read_text())
    del doc["stages"]["broken"], doc["stages"]["after-broken"]
    (toy / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _sweep(toy).returncode == 0
    doc["stages"]["a"]["cmd"] = "echo a  > a.txt"  # a new command with the same output: b stays up to date
    (toy / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _sweep(toy).returncode == 0
    assert _by_status(_summary(toy), "done") == {"a"}
    doc["stages"]["a"]["cmd"] = "echo A > a.txt"  # a new output: b reruns after a
    (toy / "dvc.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _sweep(toy).returncode == 0
    assert _by_status(_summary(toy), "done") == {"a", "b"}
    assert (toy / "b.txt").read_text() == "A\n" and _dvc_stale(toy) == set()


# ====================================================================== part 2: a real Ray cluster

ray_needed = pytest.mark.skipif(shutil.which("ray", path=str(BIN)) is None or sys.platform != "linux",
                                reason="needs Ray in this env (pip install 'ray>=2.60,<3') and Linux /proc")

# `ray start` replaces 127.0.0.1 with the machine's routable IP, and Ray's gRPC servers listen on every interface
# unless the node IP is 127.0.0.1. Keeping the address as given keeps every server of the test on loopback.
RAY_NODE = ("import sys\nimport ray._private.services as services\n"
            "services.resolve_ip_for_localhost = lambda host: host\n"
            "from ray.scripts.scripts import main\nsys.argv[0] = 'ray'\nsys.exit(main())\n")
# The driver's switch for loopback-only clusters (it then connects to 127.0.0.1 as given).
DRIVER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    except (OSError, IndexError, ValueError):
        return None


def _session_pids(sid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _session(int(p)) == sid]


def _kill_session(sid: int) -> None:
    """SIGKILL every process of a session this test started (a whole Ray node: raylet, agents, workers, cells)."""
    for _ in range(20):
        pids = _session_pids(sid)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


class RayNode:
    """One ``ray start --block`` process tree in its own session."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-c", RAY_NODE, "start", "--block", *args], env=_env(
                RAY_USAGE_STATS_ENABLED="0"), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while "Ray runtime started" not in log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                pytest.fail(f"ray node did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        _kill_session(self.proc.pid)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.kill()


def _start_mlflow(store: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'db.sqlite'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--artifacts-destination", str(store / "artifacts")],
                            cwd=store, env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


def _wait_http(uri: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server at {uri} did not start")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A real ``mlflow server`` and a Ray cluster of a head and a second worker node, all on 127.0.0.1 and one CPU
    per node (a short Ray temp dir: Unix socket paths are limited in length)."""
    mlflow_proc, uri = _start_mlflow(tmp_path_factory.mktemp("mlflow"))  # starts while the Ray nodes come up
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    logs = tmp_path_factory.mktemp("raylogs")
    port = _free_port()
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--object-store-memory", str(80 * 2**20),
              "--disable-usage-stats", "--temp-dir", str(temp)]
    nodes: list[RayNode] = []
    try:
        nodes.append(RayNode(["--head", "--port", str(port), "--include-dashboard", "false", *common],
                             logs / "head.log"))
        nodes.append(RayNode(["--address", f"127.0.0.1:{port}", *common], logs / "worker.log"))
        _wait_http(uri, mlflow_proc)
        yield {"address": f"127.0.0.1:{port}", "head": nodes[0], "worker": nodes[1], "mlflow": uri}
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(temp, ignore_errors=True)
        os.killpg(mlflow_proc.pid, signal.SIGTERM)
        try:
            mlflow_proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(mlflow_proc.pid, signal.SIGKILL)
            mlflow_proc.wait()


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the repository with the tiny preset's params.yaml and nothing run yet."""
    dst = copy_repo(tmp_path_factory.mktemp("sweepproj"))
    assert _run(["git", "init", "-q"], dst).returncode == 0
    res = _run([str(BIN / "mmdd"), "init-params", "--preset", "tiny", *GRID], dst)
    assert res.returncode == 0, res.stderr
    return dst


def _ray_sweep(project: Path, stack: dict, *args: str) -> subprocess.CompletedProcess:
    return _sweep(project, "--runner", "ray", "--address", stack["address"], *args,
                  MLFLOW_TRACKING_URI=stack["mlflow"], **DRIVER_ENV)


CELLS = [("random", 0), ("random", 1), ("forgetting", 0), ("forgetting", 1)]


def _cell(project: Path, method: str, seed: int) -> Path:
    return project / f"results/cells/tiny/shapes/{method}/b10/s{seed}"


@pytest.fixture(scope="module")
def first_sweep(project, stack):
    """The whole tiny grid, from nothing, through the Ray cluster: (result, summary, wall seconds)."""
    t0 = time.perf_counter()
    res = _ray_sweep(project, stack)
    return res, _summary(project), time.perf_counter() - t0


@ray_needed
def test_ray_sweep_runs_every_cell_once_on_both_nodes(project, stack, first_sweep):
    res, stages, wall = first_sweep
    assert res.returncode == 0, res.stderr[-5000:]
    assert set(stages) >= {"fetch@shapes", "embed@shapes", "experts@shapes", "full-data@shapes",
                           "report", "distill-random@shapes-10-0", "evaluate@shapes-forgetting-10-1"}
    assert _by_status(stages, "done") == set(stages)
    assert all(_attempts(s) == [1] * len(s["tasks"]) for s in stages.values())  # every task ran exactly once
    assert [t["id"] for t in stages["experts@shapes"]["tasks"]] == ["experts@shapes[0]", "experts@shapes[1]"]
    nodes = {a["node"] for s in stages.values() for t in s["tasks"] for a in t["attempts"]}
    assert len(nodes) == 2, nodes  # both nodes worked
    for s in stages.values():
        for t in s["tasks"]:
            heads = HEADER.findall((project / t["log"]).read_text())
            assert [(h[0], h[1]) for h in heads] == [(t["id"], "1")]
    # outputs, recorded by DVC: dvc status is clean
    for method, seed in CELLS:
        for name in ("distilled.safetensors", "distilled.json", "metrics.json", "artifacts/images.png"):
            assert (_cell(project, method, seed) / name).exists(), (method, seed, name)
    assert (project / "results/tables/tiny/shapes.md").exists()
    assert _dvc_stale(project) == set()
    # MLflow runs went through the server (no local store in the project), one per cell
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack["mlflow"])
    exp = client.get_experiment_by_name("mmdd/tiny/shapes")
    assert exp is not None
    runs = [r for r in client.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("mmdd.level") == "seed"]
    assert sorted(r.info.run_name for r in runs) == sorted(f"{m}/b10/s{s}" for m, s in CELLS)
    assert all(r.info.status == "FINISHED" for r in runs) and not (project / "mlflow.db").exists()
    print(f"\ntiny grid through the Ray cluster (head + 1 worker node): {wall:.1f} s")


@ray_needed
def test_failing_cell_is_retried_then_reported_without_stopping_others(project, stack, first_sweep):
    assert first_sweep[0].returncode == 0
    params = project / "params.yaml"
    saved = params.read_text()
    try:
        doc = yaml.safe_load(saved)
        for cell in doc["methods"]["forgetting"]["shapes"].values():
            cell["bogus"] = 1
        params.write_text(yaml.safe_dump(doc, sort_keys=False))
        shutil.rmtree(_cell(project, "random", 1))
        res = _ray_sweep(project, stack, "--retries", "1")
    finally:
        params.write_text(saved)
    assert res.returncode == 1, res.stderr[-5000:]
    stages = _summary(project)
    failed = {"distill-forgetting@shapes-10-0", "distill-forgetting@shapes-10-1"}
    assert _by_status(stages, "failed") == failed
    for name in failed:
        assert _attempts(stages[name]) == [2] and "has no parameter 'bogus'" in stages[name]["error"]
        assert f"failed  {name} (2 attempt(s))" in res.stderr and f"log: results/logs/{name}.log" in res.stderr
        assert len(HEADER.findall((project / f"results/logs/{name}.log").read_text())) == 3  # 1 + 2 retried
    assert _by_status(stages, "done") == {"distill-random@shapes-10-1", "evaluate@shapes-random-10-1"}
    assert _by_status(stages, "blocked") == {"evaluate@shapes-forgetting-10-0",
                                             "evaluate@shapes-forgetting-10-1", "report"}
    assert all(s["tasks"] == [] for n, s in stages.items() if s["status"] == "up-to-date")  # nothing ran twice
    assert (_cell(project, "random", 1) / "metrics.json").exists()


def _find_victim(project: Path, worker_sid: int, deadline: float) -> tuple[str, int]:
    """A distill task whose command is running on the worker node right now: (task id, Ray worker pid)."""
    while time.time() < deadline:
        for log in (project / "results/logs").glob("distill-*.log"):
            heads = HEADER.findall(log.read_text())
            if not heads:
                continue
            task, _, _, pid = heads[-1]
            pid = int(pid)
            children = [p for p in _session_pids(worker_sid) if _ppid(p) == pid]
            if _session(pid) == worker_sid and children:
                return task, pid
        time.sleep(0.1)
    pytest.fail("no distill task started on the worker node")


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


@ray_needed
def test_killed_worker_node_leaves_no_partial_output_and_next_sweep_completes_the_rest(project, stack, first_sweep):
    from benchmark.distilled import DistilledSet

    assert first_sweep[0].returncode == 0
    for method, seed in [("forgetting", 0), ("random", 0)]:  # two distill cells at once: one per node
        shutil.rmtree(_cell(project, method, seed))
    for log in (project / "results/logs").glob("*.log"):
        log.unlink()
    proc = subprocess.Popen([sys.executable, "-m", "benchmark.sweep", "--runner", "ray", "--address",
                             stack["address"], "--retries", "0"], cwd=project,
                            env=_env(MLFLOW_TRACKING_URI=stack["mlflow"], **DRIVER_ENV), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        victim, _ = _find_victim(project, stack["worker"].proc.pid, time.time() + 240)
        time.sleep(0.5)  # the cell's command is importing / distilling
        stack["worker"].kill()
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, out[-5000:]
    first = _summary(project)
    assert first[victim]["status"] == "failed" and _attempts(first[victim]) == [1]
    assert re.search(r"NodeDied|WorkerCrashed|died|dead", first[victim]["error"]), first[victim]["error"]
    assert f"failed  {victim}" in out
    done_first = _by_status(first, "done")
    assert done_first, "the head node should have completed other cells"
    # no half-written output: what exists is complete; the victim's stage is not recorded by DVC
    for method, seed in CELLS:
        cell = _cell(project, method, seed)
        if (cell / "distilled.json").exists():
            DistilledSet.load(cell / "distilled")
        if (cell / "metrics.json").exists():
            assert "protocols" in json.loads((cell / "metrics.json").read_text())
    assert victim in _dvc_stale(project)
    # the second sweep (the worker node is gone; the head carries on) runs exactly what is missing
    res = _ray_sweep(project, stack, "--retries", "0")
    assert res.returncode == 0, res.stderr[-5000:]
    second = _summary(project)
    assert _by_status(second, "done") == _by_status(first, "failed") | _by_status(first, "blocked")
    assert not _by_status(second, "done") & done_first
    assert _dvc_stale(project) == set()
    assert not list((project / "results/cells").rglob("*.tmp"))
    for method, seed in CELLS:
        DistilledSet.load(_cell(project, method, seed) / "distilled")
        assert json.loads((_cell(project, method, seed) / "metrics.json").read_text())["protocols"]
