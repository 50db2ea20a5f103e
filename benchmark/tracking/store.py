"""The MLflow store: where it lives, its one-time initialisation, and a thin client for the run layout.

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

    def experiment_id(self, name: str, tags: dict[str, str] | None = None) -> str:
        """Get or create experiment ``name`` (``tags``, e.g. its description, set on it); safe when several processes
        create it at once."""
        from mlflow.exceptions import MlflowException

        for attempt in range(20):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                for k, v in (tags or {}).items():
                    if exp.tags.get(k) != v:
                        self.client.set_experiment_tag(exp.experiment_id, k, v)
                return exp.experiment_id
            try:
                location = (self.root / ARTIFACTS_NAME / name.replace("/", "-")).as_uri() if _is_local(self.uri) \
                    else None
                return self.client.create_experiment(name, artifact_location=location, tags=tags)
            except MlflowException as exc:  # lost a creation race or the sqlite file was busy
                log.debug("experiment creation retry %d: %s", attempt, exc)
                time.sleep(0.1 * (attempt + 1))
        raise RuntimeError(f"could not create or find MLflow experiment {name!r} at {self.uri}")

    def runs(self, experiment_id: str, filter_string: str = "", deleted: bool = False) -> list:
        """Every run of an experiment matching ``filter_string`` (all pages)."""
        from mlflow.entities import ViewType

        out, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string, max_results=1000, page_token=token,
                                           run_view_type=ViewType.ALL if deleted else ViewType.ACTIVE_ONLY)
            out += list(page)
            token = page.token
            if not token:
                return out

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, int]], timestamp_ms: int | None = None) -> None:
        """Log ``(name, value, step)`` triples in batches of MLflow's maximum size."""
        from mlflow.entities import Metric

        now = timestamp_ms or int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v, step in metrics]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000], synchronous=True)

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Log (flattened) params; a value longer than MLflow's limit is cut."""
        from mlflow.entities import Param

        items = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i:i + 100], synchronous=True)


def prepare_views(tracker: Tracker, prefix: str) -> list[tuple[str, str]]:
    """Give every benchmark experiment (``<prefix>/...``) the ranking view; returns their (name, id), sorted."""
    from benchmark.tracking.layout import experiment_view_tags

    out = []
    for exp in tracker.client.search_experiments():
        if exp.name.startswith(f"{prefix}/"):
            for key, value in experiment_view_tags().items():
                if exp.tags.get(key) != value:
                    tracker.client.set_experiment_tag(exp.experiment_id, key, value)
            out.append((exp.name, exp.experiment_id))
    return sorted(out)


def serve_ui(uri: str, host: str = "127.0.0.1", port: int = 5000, timeout_s: float = 120.0,
             experiment_prefix: str = "mmdd") -> int:
    """Serve the MLflow UI on ``uri`` until Ctrl-C (``port`` 0: a free one); 1 when the server fails.

    Logs the URL of each benchmark experiment's ranking view (method, budget, seed, strict recall and its interval,
    best first) and of its chart view. The server runs through this interpreter (no ``mlflow`` on PATH needed) in
    a process group of its own, which is killed on every exit, so no MLflow worker outlives this call. A busy port
    is a ValueError before anything starts.
    """
    from benchmark.tracking.layout import (COMPARE_VIEW_KEY, CROSS_VIEW_KEY, SEEDS_VIEW_KEY, VIEW_TAG_PREFIX,
                                           landing_url)
    from benchmark.ui_server import free_port, require_free_port, run_server, server_url

    port = free_port(host) if port == 0 else require_free_port(host, port)
    base = server_url(host, port)
    tracker = Tracker(uri)
    for name, exp_id in prepare_views(tracker, experiment_prefix):
        log.info("%s: ranking table %s", name, landing_url(base, exp_id))
        log.info("%s: method comparison (charts) %s", name, landing_url(base, exp_id, COMPARE_VIEW_KEY))
        log.info("%s: every seed run, grouped by method %s", name, landing_url(base, exp_id, SEEDS_VIEW_KEY))
        if VIEW_TAG_PREFIX + CROSS_VIEW_KEY in tracker.client.get_experiment(exp_id).tags:
            log.info("%s: cross-architecture recall (charts) %s", name, landing_url(base, exp_id, CROSS_VIEW_KEY))
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]  # one local user: one worker starts in a fraction of the time of the default 4
    log.info("starting the MLflow UI on %s:%d (store %s)", host, port, uri)
    return run_server(cmd, host, port, timeout_s)
