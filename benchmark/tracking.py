"""MLflow tracking: one experiment per dataset, one run per grid cell, nested runs per evaluation student.

The tracking URI defaults to an *absolute* sqlite file in the project (``<project>/mlflow.db``), never a
cwd-relative path; a DVC experiment running in a temporary copy (``<project>/.dvc/tmp/exps/...``) records into
the main project's store. ``MLFLOW_TRACKING_URI`` (e.g. ``http://host:5000``) overrides it. Uses
:class:`mlflow.MlflowClient` only (no fluent-API global run state).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import unquote

log = logging.getLogger(__name__)
STORE_NAME = "mlflow.db"
ARTIFACTS_NAME = "mlartifacts"
_READY: set[str] = set()  # store URIs this process has initialised
_READY_LOCK = threading.Lock()


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The project directory: the main checkout even from inside a DVC experiment's temporary copy."""
    p = Path(start or Path.cwd()).resolve()
    parts = p.parts
    for i in range(len(parts) - 2):
        if parts[i] == ".dvc" and parts[i + 1] == "tmp" and parts[i + 2] == "exps":
            return Path(*parts[:i])
    for d in (p, *p.parents):
        if (d / "dvc.yaml").exists() or (d / ".git").exists():
            return d
    return p


def tracking_uri(root: str | os.PathLike | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<absolute project root>/mlflow.db``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{project_root(root) / STORE_NAME}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (SQLAlchemy: ``sqlite:////abs`` or ``sqlite:///rel``); None for
    in-memory or non-sqlite stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = unquote(uri[len(prefix):].split("?", 1)[0])
    if not path or path == ":memory:":
        return None
    return Path(path)


def ensure_store(uri: str) -> None:
    """Create and migrate a local sqlite store once, under an inter-process lock beside the database.

    MLflow migrates a fresh sqlite database on its client's first call; several processes doing that at once race in
    alembic (``table ... already exists``). The first process to take the lock migrates the schema and creates the
    default experiment; the others wait, then find the store ready. Remote stores migrate on the server: no-op.
    """
    db = sqlite_path(uri)
    if db is None:
        return
    with _READY_LOCK:
        if uri in _READY:
            return
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                from mlflow import MlflowClient

                MlflowClient(tracking_uri=uri).search_experiments(max_results=1)  # builds (migrates) the store
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        _READY.add(uri)
        log.debug("MLflow store %s ready", uri)


def _is_local(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """A thin, retrying wrapper over :class:`mlflow.MlflowClient` for the benchmark's run layout."""

    def __init__(self, uri: str | None = None, root: str | os.PathLike | None = None):
        from mlflow import MlflowClient

        self.root = project_root(root)
        self.uri = uri or tracking_uri(self.root)
        ensure_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)

    def experiment_id(self, name: str) -> str:
        """Get or create experiment ``name``; safe when several processes create it at once."""
        from mlflow.exceptions import MlflowException

        for attempt in range(20):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            try:
                location = (self.root / ARTIFACTS_NAME / name).as_uri() if _is_local(self.uri) else None
                return self.client.create_experiment(name, artifact_location=location)
            except MlflowException as exc:  # lost a creation race or the sqlite file was busy
                log.debug("experiment creation retry %d: %s", attempt, exc)
                time.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"could not create or find MLflow experiment {name!r} at {self.uri}")

    def find_run(self, experiment_id: str, cell_key: str) -> str | None:
        runs = self.client.search_runs([experiment_id], f"tags.`mmdd.cell_key` = '{cell_key}' and "
                                                        "attributes.status = 'FINISHED'", max_results=1)
        return runs[0].info.run_id if runs else None

    def log_cell(self, experiment: str, run_name: str, cell_key: str, params: dict[str, Any], tags: dict[str, Any],
                 metrics: dict[str, float], history: list[dict[str, float]], students: list[dict[str, float]],
                 artifacts: list[Path]) -> str:
        """Log one grid cell (skipped if a finished run with the same key exists); returns the run id."""
        from mlflow.entities import Metric, Param, RunTag

        exp_id = self.experiment_id(experiment)
        existing = self.find_run(exp_id, cell_key)
        if existing:
            log.info("MLflow run for %s already recorded (%s)", run_name, existing)
            return existing
        for stale in self.client.search_runs([exp_id], f"tags.`mmdd.cell_key` = '{cell_key}' and "
                                                       "attributes.status = 'RUNNING'"):
            self.client.set_terminated(stale.info.run_id, status="KILLED")  # left by an interrupted stage
        tags = {**{k: str(v) for k, v in tags.items()}, "mmdd.cell_key": cell_key,
                "mlflow.source.git.commit": git_commit(self.root)}
        run = self.client.create_run(exp_id, tags=tags, run_name=run_name)
        rid = run.info.run_id
        now = int(time.time() * 1000)
        params_list = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000])
                       for k, v in flatten(params).items()]
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for rec in history:
            step = int(rec.get("step", 0))
            ms += [Metric(f"distill.{k}", float(v), now, step) for k, v in rec.items() if k != "step"]
        for i in range(0, max(len(params_list), 1), 100):
            self.client.log_batch(rid, params=params_list[i:i + 100])
        for i in range(0, len(ms), 900):
            self.client.log_batch(rid, metrics=ms[i:i + 900])
        for path in artifacts:
            if path.exists():
                self.client.log_artifact(rid, str(path))
        exp_tags = {k: v for k, v in tags.items() if k.startswith("mmdd.") and k != "mmdd.cell_key"}
        for k, student in enumerate(students):
            child = self.client.create_run(exp_id, run_name=f"{run_name}/student{k}",
                                           tags={**exp_tags, "mlflow.parentRunId": rid, "mmdd.student": str(k)})
            self.client.log_batch(child.info.run_id, metrics=[Metric(m, float(v), now, 0) for m, v in student.items()
                                                              if isinstance(v, (int, float))])
            self.client.set_terminated(child.info.run_id)
        self.client.set_terminated(rid)
        return rid


def serve_ui(uri: str, host: str = "127.0.0.1", port: int = 5000, timeout_s: float = 120.0) -> int:
    """Serve the MLflow UI on ``uri`` until Ctrl-C (``port`` 0: a free one); 1 when the server fails.

    The server runs through this interpreter (no ``mlflow`` on PATH needed) in a process group of its own, which is
    killed on every exit, so no MLflow worker outlives this call. A busy port is a ValueError before anything starts.
    """
    from benchmark.ui_server import free_port, require_free_port, run_server

    port = free_port(host) if port == 0 else require_free_port(host, port)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]  # one local user: one worker starts in a fraction of the time of the default 4
    log.info("starting the MLflow UI on %s:%d (store %s)", host, port, uri)
    return run_server(cmd, host, port, timeout_s)


def cell_record(cfg, cell, key: str, res: dict[str, Any], method_params: dict[str, Any],
                history: list[dict[str, float]], volatile: dict[str, Any]) -> dict[str, Any]:
    """The MLflow schema of one evaluated cell: experiment, run name, params, tags, metrics and per-student values
    (``cfg`` a BenchConfig, ``cell`` a stages.cells.Cell, ``res`` the cell's metrics.json)."""
    metrics: dict[str, float] = {"pairs": res["pairs"], "bytes": res["bytes"]}
    for proto, summary in res["protocols"].items():
        prefix = "test" if proto == "strict" else f"test_{proto}"
        metrics |= {f"{prefix}.{k}": v["mean"] for k, v in summary.items() if isinstance(v, dict)}
        metrics |= {f"{prefix}.{k}_std": v["std"] for k, v in summary.items() if isinstance(v, dict)}
    for name, value in volatile.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[name] = float(value)
    params = {"method": cell.method, "budget": cell.budget, "seed": cell.seed, "dataset": cell.dataset,
              "method_params": method_params, "eval": asdict(cfg.eval),
              "student": {"tower": cfg.student.tower, "temperature": cfg.student.temperature},
              "text_encoder": cfg.text_encoder}
    tags = {"mmdd.preset": cfg.preset, "mmdd.protocol": ",".join(cfg.eval.protocols), "mmdd.method": cell.method,
            "mmdd.budget": cell.budget, "mmdd.seed": cell.seed, "mmdd.dataset": cell.dataset, "mmdd.stage": "evaluate"}
    students = [{f"{proto}.{k}": v for proto, summary in res["protocols"].items()
                 for k, v in summary["students"][i].items()} for i in range(cfg.eval.students)]
    return {"experiment": f"{cfg.tracking.experiment_prefix}-{cell.dataset}",
            "run_name": f"{cell.method}/b{cell.budget}/s{cell.seed}", "cell_key": key, "params": params, "tags": tags,
            "metrics": metrics, "history": history, "students": students}
