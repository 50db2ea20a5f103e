"""Record what the stages did in MLflow, around the stage calls (the CLI's job; no stage imports this).

- :meth:`Recorder.distilling` opens a cell's seed run when its distillation starts (and its parent row run when
  it is new), follows ``distill_log.jsonl`` while the method runs so the loss curves are live, and closes the run
  FINISHED, FAILED or KILLED with the real duration.
- :meth:`Recorder.evaluated` adds the test metrics, per-student values and artifacts to the seed run and refreshes
  the parent's aggregate over the seeds evaluated so far.
- :meth:`Recorder.references` logs the reference rows; :meth:`Recorder.sync` records every result on disk that
  is not in MLflow yet (results computed with tracking off, or cached by DVC) and refreshes every row.

Every public method logs a warning and returns None when the store fails: results are on disk already.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

from benchmark.stages.cells import Cell, read_history
from benchmark.tracking import layout as L
from benchmark.tracking.store import Tracker, git_commit

log = logging.getLogger(__name__)
ARTIFACTS = ("images.png", "nearest_captions.tsv", "loss_curve.png")
CREATED_TAG = "mmdd.created_ns"  # creation order of row runs (their start time may be backdated)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _safely(what: str):
    """Decorator: a store failure becomes one warning (results are already on disk), the call returns None."""
    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(self, *args, **kwargs):
            try:
                return fn(self, *args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - tracking records results that are already saved
                log.warning("MLflow tracking failed while %s (%s: %s); the results on disk are complete, "
                            "`mmdd record` records them later", what, type(exc).__name__, exc)
                return None
        return inner
    return wrap


class LogFollower:
    """Logs the new lines of a cell's jsonl logs as metrics every ``interval_s`` seconds, in a daemon thread."""

    def __init__(self, tracker: Tracker, run_id: str, paths: list[Path], interval_s: float = 2.0):
        self.tracker, self.run_id, self.paths, self.interval_s = tracker, run_id, paths, interval_s
        # what the logs hold now belongs to an earlier run; a method that starts (or resumes) replaces the file
        # (JsonlLogger.truncate), and from then on every line is this run's
        self.inodes, self.offsets = {}, {}
        for p in paths:
            self.inodes[p], self.offsets[p] = self._stat(p)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mmdd-mlflow-follow", daemon=True)

    def __enter__(self) -> LogFollower:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
        self.poll()  # what was written after the last tick

    def _loop(self) -> None:
        while not self.stop_event.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - a live curve is a convenience; the final record is complete
                log.debug("live MLflow logging skipped a tick: %s", exc)

    @staticmethod
    def _stat(path: Path) -> tuple[int, int]:
        try:
            st = path.stat()
        except OSError:
            return -1, 0
        return st.st_ino, st.st_size

    def poll(self) -> int:
        """Log every complete new line of the logs; returns how many records were logged."""
        records = []
        for path in self.paths:
            inode, size = self._stat(path)
            if inode < 0:
                continue
            if inode != self.inodes[path] or size < self.offsets[path]:  # replaced or truncated: read it afresh
                self.inodes[path], self.offsets[path] = inode, 0
            with open(path, "rb") as f:
                f.seek(self.offsets[path])
                chunk = f.read()
            end = chunk.rfind(b"\n") + 1  # only complete lines; a partial one is read next time
            self.offsets[path] += end
            for line in chunk[:end].decode("utf-8", "replace").splitlines():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        metrics = L.history_metrics(records)
        if metrics:
            self.tracker.log_metrics(self.run_id, metrics)
        return len(records)


class Recorder:
    """The MLflow record of one benchmark configuration (``ctx``: a StageContext)."""

    def __init__(self, ctx, uri: str | None = None):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.tracker = Tracker(uri or self.cfg.tracking.uri or None, root=ctx.layout.results_root)
        self.client = self.tracker.client
        self._experiments: dict[str, str] = {}

    @functools.cached_property
    def commit(self) -> str:
        """The project's git commit (one ``git`` call per recorder, not one per run)."""
        return git_commit(self.tracker.root)

    # identities -------------------------------------------------------------------------------------------------
    def experiment(self, ds: str) -> str:
        if ds not in self._experiments:
            cfg = self.cfg
            tags = {L.NOTE_TAG: L.experiment_description(cfg.preset, cfg.role, ds, cfg.grid.seeds),
                    **L.experiment_view_tags()}
            self._experiments[ds] = self.tracker.experiment_id(
                L.experiment_name(cfg.tracking.experiment_prefix, cfg.preset, ds), tags)
        return self._experiments[ds]

    def group(self, cell: Cell) -> str:
        params = self.cfg.cell_params(cell.method, cell.dataset, cell.budget)
        return L.group_key(self.cfg.preset, cell.dataset, cell.method, cell.budget, params, L.eval_settings(self.cfg),
                           asdict(self.ctx.student))

    def _tags(self, cell: Cell, level: str, key: str) -> dict[str, str]:
        role = "study" if cell.method in self.cfg.report.study else (
            "coreset" if cell.method in self.cfg.report.coresets else "main")
        tags = {L.KIND: "method", L.LEVEL: level, L.KEY: key, "mmdd.preset": self.cfg.preset,
                "mmdd.dataset": cell.dataset, "mmdd.method": cell.method, "mmdd.budget": str(cell.budget),
                "mmdd.role": role, "mlflow.source.git.commit": self.commit}
        if level == L.SEED:
            tags["mmdd.seed"] = str(cell.seed)
        return tags

    def _find(self, exp: str, key: str) -> list:
        return self.tracker.runs(exp, f"tags.`{L.KEY}` = '{key}'")

    def parent(self, cell: Cell, reopen: bool = False, start_ms: int | None = None) -> str:
        """The row run of ``cell``'s (method, budget) under this configuration, created when missing."""
        exp, key = self.experiment(cell.dataset), self.group(cell)
        found = self._find(exp, key)
        if found:
            run = self._one_row(exp, found)
            if reopen and run.info.status != "RUNNING":
                self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(exp, start_time=start_ms, run_name=L.parent_name(cell.method, cell.budget),
                                     tags={**self._tags(cell, L.AGGREGATE, key), CREATED_TAG: str(time.time_ns()),
                                           L.NOTE_TAG: f"{cell.method} at {cell.budget} pairs: mean over the grid "
                                                       "seeds ± 95 % t half-width (`.ci95`); expand for each seed."})
        params = self.cfg.cell_params(cell.method, cell.dataset, cell.budget)
        self.tracker.log_params(run.info.run_id, {"method": cell.method, "budget": cell.budget,
                                                  "dataset": cell.dataset, "preset": self.cfg.preset,
                                                  "hp": params, "eval": L.eval_settings(self.cfg),
                                                  "student": {"tower": self.cfg.student.tower,
                                                              "temperature": self.cfg.student.temperature},
                                                  "text_encoder": self.cfg.text_encoder})
        return self._one_row(exp, self._find(exp, key)).info.run_id  # another process may have made one too

    def _one_row(self, exp: str, found: list):
        """The row run among ``found`` (runs with one row key), removing the others.

        Two processes that start seeds of one row at once may each create its row run. Both keep the one created
        first (the other process searched before it existed, so it is the earlier): every process converges on
        it, and the other's children, if any, move to it."""
        def created(run) -> tuple[int, str]:
            return int(run.data.tags.get(CREATED_TAG) or run.info.start_time * 10**6), run.info.run_id

        keep, *extra = sorted(found, key=created)
        for other in extra:
            for child in self.tracker.runs(exp, f"tags.`{L.PARENT_TAG}` = '{other.info.run_id}'"):
                self.client.set_tag(child.info.run_id, L.PARENT_TAG, keep.info.run_id)
            try:
                self.client.delete_run(other.info.run_id)
            except Exception as exc:  # noqa: BLE001 - the other process deleted it first
                log.debug("row run %s already removed: %s", other.info.run_id, exc)
        return keep

    def _seed_runs(self, cell: Cell) -> list:
        return self._find(self.experiment(cell.dataset), L.seed_key(self.group(cell), cell.seed))

    def _new_seed_run(self, cell: Cell, start_ms: int | None = None) -> str:
        exp, parent = self.experiment(cell.dataset), self.parent(cell, reopen=True, start_ms=start_ms)
        key = L.seed_key(self.group(cell), cell.seed)
        for old in self._find(exp, key):  # a re-distilled cell replaces its record
            self.client.delete_run(old.info.run_id)
        run = self.client.create_run(exp, start_time=start_ms, run_name=L.seed_name(cell.method, cell.budget, cell.seed),
                                     tags={**self._tags(cell, L.SEED, key), L.PARENT_TAG: parent})
        self.tracker.log_params(run.info.run_id, {"method": cell.method, "budget": cell.budget, "seed": cell.seed})
        return run.info.run_id

    # distillation -----------------------------------------------------------------------------------------------
    @contextmanager
    def distilling(self, cell: Cell, interval_s: float = 2.0) -> Iterator[str | None]:
        """Around a cell's distillation: its seed run is open (RUNNING) while it runs, with live curves."""
        rid = self._start(cell)
        if rid is None:
            yield None
            return
        cell_dir = self.ctx.cell_dir(cell)
        follower = LogFollower(self.tracker, rid, [cell_dir / "distill_log.jsonl",
                                                   cell_dir / "distill_log.volatile.jsonl"], interval_s)
        status = "FAILED"
        try:
            with follower:
                yield rid
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            self._finish_distill(cell, rid, status)

    @_safely("opening a seed run")
    def _start(self, cell: Cell) -> str | None:
        return self._new_seed_run(cell)

    @_safely("closing a seed run")
    def _finish_distill(self, cell: Cell, rid: str, status: str) -> None:
        volatile = _read_json(self.ctx.cell_dir(cell) / "distill.volatile.json") if status == "FINISHED" else None
        metrics = L.cost_metrics(volatile)
        if metrics:
            self.tracker.log_metrics(rid, [(k, v, 0) for k, v in metrics.items()])
        self.client.set_terminated(rid, status=status)
        self.refresh(cell)

    # evaluation -------------------------------------------------------------------------------------------------
    @_safely("recording an evaluation")
    def evaluated(self, cell: Cell, refresh: bool = True) -> str | None:
        """Record ``cell``'s metrics.json in its seed run (made from the files if distillation was not recorded)
        and refresh the row (unless ``refresh`` is False: the caller refreshes once per row); returns the seed run
        id."""
        cell_dir = self.ctx.cell_dir(cell)
        res = _read_json(cell_dir / "metrics.json")
        if res is None:
            return None
        found = self._seed_runs(cell)
        rid = found[0].info.run_id if found else self._backfill_distill(cell)
        run = self.client.get_run(rid)
        if run.data.tags.get("mmdd.eval_key") == res["key"]:
            return rid
        volatile = _read_json(cell_dir / "evaluate.volatile.json") or {}
        now = int(time.time() * 1000)
        metrics = [(k, v, 0) for k, v in L.test_metrics(res["protocols"]).items()]
        metrics += L.student_metrics(res["protocols"])
        metrics += [(k, v, 0) for k, v in L.cost_metrics(_read_json(cell_dir / "distill.volatile.json"),
                                                          volatile.get("eval_seconds")).items()]
        self.tracker.log_metrics(rid, metrics, now)
        for name in ARTIFACTS:
            if (cell_dir / "artifacts" / name).is_file():
                self.client.log_artifact(rid, str(cell_dir / "artifacts" / name))
        self.client.set_tag(rid, "mmdd.eval_key", res["key"])
        if refresh:
            self.refresh(cell)
        return rid

    def _backfill_distill(self, cell: Cell) -> str:
        """A seed run for a set distilled without a record: its log and cost from the cell's files, its start and
        end times from the distillation's measured seconds where known."""
        cell_dir = self.ctx.cell_dir(cell)
        volatile = _read_json(cell_dir / "distill.volatile.json") or {}
        # the stage writes distill.volatile.json when it ends; the set's own mtime may be DVC's cache copy's
        end = next((p for p in (cell_dir / "distill.volatile.json", cell_dir / "distilled.safetensors")
                    if p.exists()), None)
        end_ms = int((end.stat().st_mtime if end else time.time()) * 1000)
        start_ms = end_ms - int(1000 * float(volatile.get("seconds") or 0.0))
        rid = self._new_seed_run(cell, start_ms)
        metrics = L.history_metrics(read_history(cell_dir)) + [(k, v, 0) for k, v in L.cost_metrics(volatile).items()]
        self.tracker.log_metrics(rid, metrics, end_ms)
        self.client.set_terminated(rid, status="FINISHED", end_time=end_ms)
        return rid

    @_safely("recording a cross-architecture evaluation")
    def cross_arched(self, cell: Cell, refresh: bool = True) -> str | None:
        """Record ``cell``'s cross_arch.json in its seed run (``cross_arch.<tower>.test.*``) and refresh the row;
        the experiment's ``mmdd-cross-arch`` view lists the towers seen. Returns the seed run id."""
        res = _read_json(self.ctx.cell_dir(cell) / "cross_arch.json")
        if res is None or not res.get("towers"):
            return None
        found = self._seed_runs(cell)
        rid = found[0].info.run_id if found else self._backfill_distill(cell)
        if self.client.get_run(rid).data.tags.get("mmdd.cross_arch_key") == res["key"]:
            return rid
        self.tracker.log_metrics(rid, [(k, v, 0) for k, v in L.cross_arch_metrics(res).items()])
        self.client.set_tag(rid, "mmdd.cross_arch_key", res["key"])
        exp = self.experiment(cell.dataset)
        tag, value = L.cross_arch_view_tag(res["towers"])
        if self.client.get_experiment(exp).tags.get(tag) != value:
            self.client.set_experiment_tag(exp, tag, value)
        if refresh:
            self.refresh(cell)
        return rid

    def refresh(self, cell: Cell) -> None:
        """The row's aggregate over its seeds evaluated so far (and, apart, over the seeds evaluated across
        architectures); the row run is FINISHED when no seed runs."""
        exp, key = self.experiment(cell.dataset), self.group(cell)
        parent = self.parent(cell)
        children = [r for r in self.tracker.runs(exp, f"tags.`{L.PARENT_TAG}` = '{parent}'")
                    if r.data.tags.get(L.LEVEL) == L.SEED]

        def per_seed(prefix: str) -> dict[int, dict[str, float]]:
            return {int(r.data.tags["mmdd.seed"]): {k: v for k, v in r.data.metrics.items() if k.startswith(prefix)}
                    for r in children if any(k.startswith(prefix) for k in r.data.metrics)}

        agg = L.aggregate_metrics(per_seed("test."))
        crossed = per_seed(f"{L.CROSS_ARCH}.")
        if crossed:
            agg.update(L.aggregate_metrics(crossed, f"{L.CROSS_ARCH}.", f"{L.CROSS_ARCH}.seeds"))
        for name in ("cost.distill_seconds", "cost.distill_cpu_seconds", "cost.distill_peak_rss_mb", "set.bytes",
                     "set.pairs"):
            values = [r.data.metrics[name] for r in children if name in r.data.metrics]
            if values:
                agg[name] = sum(values) / len(values)
        # a summary: 4 decimals of a percentage is beyond any interval here, and the table stays legible
        self.tracker.log_metrics(parent, [(k, round(v, 4), 0) for k, v in agg.items()])
        if not any(r.info.status == "RUNNING" for r in children):
            start = self.client.get_run(parent).info.start_time or 0
            end = max([r.info.end_time or 0 for r in children] + [start]) or None
            self.client.set_terminated(parent, status="FINISHED", end_time=end)
        log.debug("MLflow row %s (%s): %d seed(s) evaluated", L.parent_name(cell.method, cell.budget), key,
                  int(agg["seeds"]))

    # references and backfill ------------------------------------------------------------------------------------
    @_safely("recording the reference rows")
    def references(self, ds: str) -> list[str] | None:
        """One run per reference row of ``ds`` (full data, experts), replaced when its result changed."""
        exp = self.experiment(ds)
        directory = self.ctx.layout.full_data(self.cfg.preset, ds)
        ids, labels = [], set()
        for path in sorted(directory.glob("metrics*.json")):
            res = _read_json(path)
            if res is None or "protocols" not in res or res["method"] in labels:
                continue  # e.g. the experts' final epoch asked for again in full_data.expert_epochs: one row
            labels.add(res["method"])
            key = f"{res['key']}-{path.stem}"
            found = self._find(exp, key)
            if found:
                ids.append(found[0].info.run_id)
                continue
            for old in self.tracker.runs(exp, f"tags.`{L.KIND}` = '{L.REFERENCE}' and "
                                              f"tags.`mmdd.reference` = '{path.stem}'"):
                self.client.delete_run(old.info.run_id)
            run = self.client.create_run(exp, run_name=res["method"], tags={
                L.KIND: L.REFERENCE, L.LEVEL: L.REFERENCE, L.KEY: key, "mmdd.reference": path.stem,
                "mmdd.preset": self.cfg.preset, "mmdd.dataset": ds, "mmdd.method": res["method"],
                L.NOTE_TAG: f"Reference row: {res['method']} on all {res.get('pairs')} training pairs; `.std` is "
                            "over its evaluation students (or experts), not over seeds."})
            rid = run.info.run_id
            self.tracker.log_params(rid, {"method": res["method"], "budget": "all"})
            metrics = [(k, round(v, 4), 0) for k, v in L.test_metrics(res["protocols"]).items()]  # a summary row
            metrics += L.student_metrics(res["protocols"]) + [("set.pairs", float(res.get("pairs") or 0), 0)]
            self.tracker.log_metrics(rid, metrics)
            self.client.set_terminated(rid, status="FINISHED")
            ids.append(rid)
        return ids

    @_safely("recording the results on disk")
    def sync(self) -> int | None:
        """Record every evaluated cell and reference row of the grid that MLflow lacks; returns the cells seen."""
        n, rows = 0, {}
        for cell in self.ctx.cells():
            cell_dir = self.ctx.cell_dir(cell)
            if (cell_dir / "metrics.json").is_file():
                self.evaluated(cell, refresh=False)
                rows.setdefault((cell.dataset, cell.method, cell.budget), cell)
                n += 1
            if (cell_dir / "cross_arch.json").is_file():
                self.cross_arched(cell, refresh=False)
                rows.setdefault((cell.dataset, cell.method, cell.budget), cell)
        for cell in rows.values():
            self.refresh(cell)
        for ds in self.cfg.datasets:
            self.references(ds)
        return n
