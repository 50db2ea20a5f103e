"""A fresh MLflow sqlite store is initialised once, under a file lock, even when several processes start together."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Each worker imports MLflow first, waits for a shared start signal, then creates a Tracker on the fresh store and
# logs one cell: the four workers reach the store's first use (schema migration) within milliseconds of each other.
WORKER = """
import sys, time
from pathlib import Path
import mlflow  # noqa: F401  (import cost paid before the start signal)
from benchmark.tracking import Tracker

uri, root, go, k = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
(root / f"ready{k}").touch()
while not go.exists():
    time.sleep(0.005)
tracker = Tracker(uri, root=root)
run = tracker.client.create_run(tracker.experiment_id("race"), run_name=f"cell{k}", tags={"mmdd.key": f"key{k}"})
tracker.log_metrics(run.info.run_id, [("r_mean", float(k), 0)])
tracker.client.set_terminated(run.info.run_id)
print("RUN", run.info.run_id)
"""


def _start_workers(uri: str, root: Path, n: int) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    go = root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, uri, str(root), str(go), str(k)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(n)]
    deadline = time.monotonic() + 120
    while not all((root / f"ready{k}").exists() for k in range(n)):
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.01)
    go.touch()
    return procs


def test_four_processes_on_a_fresh_sqlite_store_all_log_their_run(tmp_path):
    (tmp_path / ".git").mkdir()  # project root for the Tracker (git commit lookup just says "unknown")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = _start_workers(uri, tmp_path, 4)
    results = [(p.wait(timeout=180), *p.communicate()) for p in procs]
    failures = [f"worker {k} exited {rc}:\n{err[-3000:]}" for k, (rc, _, err) in enumerate(results) if rc != 0]
    assert not failures, "\n\n".join(failures)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("race")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    assert sorted(r.data.tags["mmdd.key"] for r in runs) == ["key0", "key1", "key2", "key3"]
    assert (tmp_path / "mlflow.db.lock").exists()


def test_ensure_store_initialises_once_and_ignores_remote_uris(tmp_path):
    from benchmark.tracking import ensure_store, sqlite_path

    db = tmp_path / "sub" / "mlflow.db"
    uri = f"sqlite:///{db}"
    assert sqlite_path(uri) == db and sqlite_path("http://127.0.0.1:5000") is None
    assert sqlite_path("sqlite:///:memory:") is None
    ensure_store(uri)
    assert db.exists() and (tmp_path / "sub" / "mlflow.db.lock").exists()
    mtime = db.stat().st_mtime_ns
    ensure_store(uri)  # already initialised in this process: no second pass
    assert db.stat().st_mtime_ns == mtime
    ensure_store("http://127.0.0.1:9")  # nothing to initialise locally, and no connection attempted


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
