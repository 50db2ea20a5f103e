"""The sweep driver: run the stale part of the DVC pipeline on an executor (local threads or a Ray cluster), in
dependency order, with bounded retries, a live progress count, ``dvc commit`` of every finished stage, and a final
summary (also written to ``<log dir>/sweep.json``).

Semantics follow ``dvc repro``: a stage runs when ``dvc status`` reports it changed, or when an upstream stage ran
in this sweep and ``dvc status`` then reports it changed. Each finished stage is committed before anything downstream
starts (the stages that finished since the last poll in one batch), so afterwards ``dvc status`` is clean and
``dvc repro`` runs nothing; an interrupted sweep leaves only complete, committed stages, and the next sweep runs what
is missing. The summary also records where the wall time went: task seconds, DVC bookkeeping, worker start-up.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from benchmark.sweep import stages as st
from benchmark.sweep.cell import Result
from benchmark.sweep.executors import Executor
from benchmark.sweep.files import atomic_write_text
from benchmark.sweep.ledger import Ledger

log = logging.getLogger("mmdd.sweep")

WAITING, RUNNING, DONE, CURRENT, FAILED, BLOCKED = "waiting", "running", "done", "up-to-date", "failed", "blocked"


@dataclass
class TaskState:
    task: st.Task
    attempts: list[Result] = field(default_factory=list)
    running: bool = False

    @property
    def ok(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].ok


@dataclass
class StageState:
    stage: st.Stage
    status: str = WAITING
    tasks: list[TaskState] = field(default_factory=list)
    error: str = ""


@dataclass
class Summary:
    seconds: float
    counts: dict[str, int]
    stages: dict[str, dict]
    timing: dict[str, float | int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.counts.get(FAILED) and not self.counts.get(BLOCKED)


class Sweep:
    """One pass over the pipeline: ``Sweep(root, ...).run(executor)`` returns the :class:`Summary`."""

    def __init__(self, root: Path, retries: int = 2, log_dir: str = "results/logs", targets: list[str] | None = None,
                 poll: float = 1.0):
        if retries < 0:
            raise st.SweepError(f"--retries must be 0 or more, not {retries}")
        self.root, self.retries, self.log_dir, self.poll = root, retries, log_dir, poll
        self.ledger = Ledger(root)
        self.pipeline = self.ledger.pipeline
        self.selected = st.select(self.pipeline, targets or [])
        self.states = {n: StageState(s) for n, s in self.pipeline.items() if n in self.selected}
        self.ran: set[str] = set()
        self.waited_s = 0.0  # for the set-up run beside the status (MLflow experiments)
        self._last_progress = ""
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ scheduling
    def run(self, executor: Executor, before_tasks: Callable[[], object] | None = None,
            started: float | None = None) -> Summary:
        """Bring the selected stages up to date; ``before_tasks`` (e.g. the tracking set-up, running in the
        background) is awaited after the status and before the first task; ``started``: the perf_counter() time the
        sweep's set-up began (for the wall time)."""
        self.executor = executor
        self._t0 = time.perf_counter() if started is None else started
        executor.warm([self.states[n].stage.cmd for n in self.states])
        try:
            initially_stale = self.ledger.stale(list(self.states))
            t0 = time.perf_counter()
            if before_tasks is not None:
                before_tasks()
            self.waited_s = time.perf_counter() - t0
        except BaseException:
            self.ledger.close()
            raise
        log.info("%d of %d stages are stale (dvc status); executor: %s", len(initially_stale), len(self.states),
                 executor.description)
        try:
            while True:
                self._schedule(initially_stale)
                self._progress()
                if not self.executor.in_flight():
                    break
                finished = self.executor.wait(self.poll)
                self._collect(finished)
        except KeyboardInterrupt:
            log.warning("interrupted: cancelling running tasks; finished stages stay committed")
            self.executor.cancel()
            for s in self.states.values():
                if s.status in (RUNNING, WAITING):
                    s.status, s.error = FAILED if s.status == RUNNING else BLOCKED, "interrupted"
        return self._finish()

    def _schedule(self, initially_stale: set[str]) -> None:
        """Resolve stages whose upstream is settled: block, skip as up to date, or submit (repeat until stable)."""
        changed = True
        while changed:
            changed, ready, recheck = False, [], []
            for name, s in self.states.items():
                if s.status != WAITING:
                    continue
                ups = [self.states[u] for u in s.stage.upstream if u in self.states]
                bad = [u.stage.name for u in ups if u.status in (FAILED, BLOCKED)]
                if bad:
                    s.status, s.error, changed = BLOCKED, f"upstream not done: {', '.join(bad)}", True
                elif any(u.status in (WAITING, RUNNING) for u in ups):
                    continue
                elif name in initially_stale:
                    ready.append(name)
                elif any(u.stage.name in self.ran for u in ups):
                    recheck.append(name)  # an upstream stage ran: ask DVC whether that changed this one
                else:
                    s.status, changed = CURRENT, True
            now_stale = self.ledger.stale(recheck)
            for name in recheck:
                if name in now_stale:
                    ready.append(name)
                else:
                    self.states[name].status = CURRENT
            for name in ready:
                self._submit(self.states[name])
            changed = changed or bool(ready or recheck)

    def _submit(self, s: StageState) -> None:
        s.status = RUNNING
        s.tasks = [TaskState(t) for t in st.tasks_for(s.stage, self.root, self.log_dir)]
        for t in s.tasks:
            self._submit_task(t)

    def _submit_task(self, t: TaskState) -> None:
        t.running = True
        self.executor.submit(t.task, len(t.attempts) + 1)

    def _collect(self, results: list[Result]) -> None:
        """Record finished attempts; retry failures; commit stages whose tasks all succeeded."""
        by_id = {t.task.id: (s, t) for s in self.states.values() for t in s.tasks}
        to_commit = []
        for r in results:
            s, t = by_id[r.task]
            t.attempts.append(r)
            t.running = False
            if r.ok:
                log.info("ok      %s (%.1f s, attempt %d, host %s, node %s)", r.task, r.seconds, r.attempt,
                         r.host, r.node)
            elif len(t.attempts) <= self.retries:
                log.warning("retry   %s: attempt %d of %d failed: %s", r.task, r.attempt, self.retries + 1, r.error)
                self._submit_task(t)
                continue
            else:
                log.error("FAILED  %s after %d attempt(s): %s", r.task, r.attempt, r.error)
                s.error = r.error
            if not any(x.running for x in s.tasks):
                if all(x.ok for x in s.tasks):
                    to_commit.append(s.stage.name)
                else:
                    s.status = FAILED
        for name, error in self.ledger.commit(to_commit).items():
            self.states[name].status, self.states[name].error = FAILED, error
            log.error("FAILED  %s: %s", name, error)
        for name in to_commit:
            if self.states[name].status == RUNNING:
                self.states[name].status = DONE
                self.ran.add(name)

    # ------------------------------------------------------------------ reporting
    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in (DONE, CURRENT, RUNNING, WAITING, FAILED, BLOCKED)}
        for s in self.states.values():
            out[s.status] += 1
        return out

    def _progress(self) -> None:
        c = self.counts()
        line = (f"{c[DONE] + c[CURRENT]}/{len(self.states)} done ({c[CURRENT]} up to date), "
                f"{c[RUNNING]} running or queued, {c[FAILED]} failed, {c[BLOCKED]} blocked, {c[WAITING]} waiting")
        if line != self._last_progress:
            self._last_progress = line
            log.info("[%6.1f s] %s", time.perf_counter() - self._t0, line)

    def timing(self, seconds: float) -> dict[str, float | int]:
        """Where the wall time went: summed task seconds and CPU, DVC bookkeeping in this driver (pipeline, status,
        commits), the wait for the MLflow set-up, executor start-up. ``overhead_fraction``: bookkeeping, that wait and
        the worker start-ups per slot (they start side by side), over the wall time."""
        attempts = [a for s in self.states.values() for t in s.tasks for a in t.attempts]
        stats = self.executor.stats()
        slots = max(1, int(stats.get("jobs", 1)))
        overhead = self.ledger.seconds + self.waited_s + float(stats.get("worker_start_s", 0.0)) / slots
        return {"wall_s": round(seconds, 3), "tasks": len(attempts),
                "task_s": round(sum(a.seconds for a in attempts), 3),
                "task_cpu_s": round(sum(a.cpu_s or 0.0 for a in attempts), 3),
                "dvc_s": round(self.ledger.seconds, 3), "tracking_wait_s": round(self.waited_s, 3), **stats,
                "overhead_fraction": round(overhead / seconds, 4) if seconds > 0 else 0.0}

    def _finish(self) -> Summary:
        seconds = time.perf_counter() - self._t0
        self.ledger.close()
        stages = {}
        for name, s in self.states.items():
            stages[name] = {"status": s.status, "error": s.error,
                            "tasks": [{"id": t.task.id, "log": t.task.log, "attempts": [asdict(a) for a in t.attempts]}
                                      for t in s.tasks]}
        summary = Summary(seconds, self.counts(), stages, self.timing(seconds))
        _write_json(self.root / self.log_dir / "sweep.json",
                    {"seconds": seconds, "counts": summary.counts, "timing": summary.timing, "stages": stages})
        c, t = summary.counts, summary.timing
        log.info("sweep finished in %.1f s: %d ran, %d up to date, %d failed, %d blocked", seconds, c[DONE],
                 c[CURRENT], c[FAILED], c[BLOCKED])
        log.info("time: tasks %.1f s, DVC bookkeeping %.1f s, worker start-up %.1f s (overhead %.1f%% of the wall "
                 "time)", t["task_s"], t["dvc_s"], t.get("worker_start_s", 0.0), 100 * t["overhead_fraction"])
        for name, s in self.states.items():
            if s.status == FAILED:
                logs = ", ".join(t.task.log for t in s.tasks if not t.ok) or "-"
                attempts = max((len(t.attempts) for t in s.tasks), default=0)
                log.error("failed  %s (%d attempt(s)): %s; log: %s", name, attempts, s.error, logs)
        for name, s in self.states.items():
            if s.status == BLOCKED:
                log.warning("blocked %s: %s", name, s.error)
        log.info("summary: %s", self.root / self.log_dir / "sweep.json")
        return summary


def _write_json(path: Path, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def plan(root: Path, targets: list[str] | None = None) -> list[list[str]]:
    """The stale stages by dependency level (``--dry-run``); stages downstream of them may also run."""
    ledger = Ledger(root)
    try:
        selected = st.select(ledger.pipeline, targets or [])
        now = ledger.stale(sorted(selected))
    finally:
        ledger.close()
    return [[n for n in level if n in now] for level in st.levels(ledger.pipeline, selected)]


def task_env(extra: list[str]) -> dict[str, str]:
    """Environment forwarded to every task: the driver's ``MLFLOW_*`` and ``MMDD_*`` plus ``--env KEY=VALUE``."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("MLFLOW_", "MMDD_"))}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise st.SweepError(f"--env expects KEY=VALUE, got {item!r}")
        env[key] = value
    return env


def prepare_tracking(root: Path, env: dict[str, str], distributed: bool) -> str | None:
    """Create the MLflow experiments once, before any task starts; returns the tracking URI (None: tracking off)."""
    params_path = root / "params.yaml"
    if not params_path.exists():
        raise st.SweepError(f"{params_path} is missing: run `mmdd init-params --preset <name>` first")
    params = yaml.safe_load(params_path.read_text()) or {}
    tcfg = params.get("tracking") or {}
    if not tcfg.get("enabled", True):
        return None
    from benchmark.tracking import Tracker
    from benchmark.tracking.layout import experiment_name

    # the URI the tasks will use: params.yaml's tracking.uri, else their MLFLOW_TRACKING_URI, else the project store
    tracker = Tracker(tcfg.get("uri") or env.get("MLFLOW_TRACKING_URI") or None, root=root)
    for ds in params.get("datasets") or []:
        tracker.experiment_id(experiment_name(tcfg.get("experiment_prefix", "mmdd"), params.get("preset", ""), ds))
    if distributed and not tracker.uri.startswith(("http://", "https://", "databricks")):
        log.warning("MLflow store %s is a local file: nodes on other machines would each write their own copy or "
                    "share SQLite over a network filesystem. Start `mlflow server` and set "
                    "MLFLOW_TRACKING_URI=http://<host>:5000 (docs/cluster.md)", tracker.uri)
    log.info("MLflow: %s", tracker.uri)
    return tracker.uri
