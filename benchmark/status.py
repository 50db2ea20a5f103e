"""``mmdd status``: how far the DVC pipeline is, per stage kind, with an ETA from measured stage times.

One ``dvc status`` (DVC's Python API, in this process) says which stages are changed; ``dvc.lock`` says which of
those ran before (stale) and which never did (remaining); every other stage is done. The ETA of the pending stages
comes from the ``*.volatile.json`` times that earlier runs wrote beside their outputs: the same cell, else its
siblings (other seeds), else its cousins (other budgets). Stages without a measurement are listed, not guessed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
STATES = ("done", "stale", "remaining")
# stage kind -> (file beside the stage's first output, key holding its seconds)
VOLATILE = {"distill": ("distill.volatile.json", "seconds"), "evaluate": ("evaluate.volatile.json", "eval_seconds"),
            "full-data": ("full_data.volatile.json", "seconds")}


@dataclass
class StageState:
    name: str
    kind: str
    state: str
    out_dir: str | None = None
    estimate_s: float | None = None  # pending stages only


@dataclass
class PipelineStatus:
    stages: list[StageState] = field(default_factory=list)

    def kinds(self) -> list[str]:
        return list(dict.fromkeys(s.kind for s in self.stages))

    def counts(self) -> dict[str, dict[str, int]]:
        out = {k: dict.fromkeys(STATES, 0) for k in self.kinds()}
        for s in self.stages:
            out[s.kind][s.state] += 1
        return out

    def pending(self) -> list[StageState]:
        return [s for s in self.stages if s.state != "done"]

    def eta_s(self) -> float:
        """Seconds for the pending stages that have a measurement (a lower bound when some have none)."""
        return sum(s.estimate_s or 0.0 for s in self.pending())

    def unmeasured(self) -> list[StageState]:
        return [s for s in self.pending() if s.estimate_s is None]

    def to_json(self) -> dict[str, Any]:
        return {"counts": self.counts(), "eta_s": self.eta_s(), "unmeasured": [s.name for s in self.unmeasured()],
                "stages": [asdict(s) for s in self.stages]}


def stage_kind(name: str) -> str:
    """``distill-lors@shapes-50-0`` -> ``distill``; ``prepare-ptm-st@shapes`` -> ``prepare``; ``report`` -> itself."""
    base = name.split("@", 1)[0]
    for prefix in ("distill", "prepare"):
        if base.startswith(prefix + "-"):
            return prefix
    return base


def locked_stages(root: Path) -> set[str]:
    """Names of the stages recorded in ``dvc.lock`` (they ran at least once)."""
    lock = root / "dvc.lock"
    if not lock.exists():
        return set()
    try:
        doc = yaml.safe_load(lock.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{lock} is not valid YAML ({exc}): restore it from git or delete it") from None
    return set((doc.get("stages") or {}) if isinstance(doc, dict) else {})


def _seconds(path: Path, key: str) -> float | None:
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def measured_seconds(kind: str, out_dir: Path) -> float | None:
    """Mean measured seconds of this stage's cell, else of its siblings, else of its cousins; None if never run."""
    if kind not in VOLATILE:
        return None
    name, key = VOLATILE[kind]
    for base, pattern in ((out_dir, name), (out_dir.parent, f"*/{name}"), (out_dir.parent.parent, f"*/*/{name}")):
        values = [v for v in (_seconds(p, key) for p in sorted(base.glob(pattern))) if v is not None]
        if values:
            return sum(values) / len(values)
    return None


def _dvc_stages(root: Path) -> tuple[list[tuple[str, str | None]], set[str]]:
    """(name, first output) of every stage of the pipeline, and the names ``dvc status`` reports changed."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            changed_keys = set(repo.status())  # keyed like the CLI prints them: relative to the cwd
            stages = [(s.name, s.outs[0].def_path if s.outs else None) for s in repo.index.stages]
            changed = {s.name for s in repo.index.stages if s.addressing in changed_keys}
    except DvcException as exc:
        raise RuntimeError(f"dvc status failed in {root}: {exc} (another `dvc repro` holding the lock? retry when "
                           "it finishes)") from None
    return stages, changed


def pipeline_status(root: str | Path) -> PipelineStatus:
    """The state of every stage of ``root``'s ``dvc.yaml``, with time estimates for the pending ones."""
    root = Path(root).resolve()
    if not (root / "dvc.yaml").exists():
        raise ValueError(f"no dvc.yaml in {root}: run `mmdd init-params --preset <name>` there, or pass --project")
    stages, changed = _dvc_stages(root)
    locked = locked_stages(root)
    out = PipelineStatus()
    for name, first_out in stages:
        state = "done" if name not in changed else "stale" if name in locked else "remaining"
        out_dir = (root / first_out).parent if first_out else None
        s = StageState(name, stage_kind(name), state, str(out_dir) if out_dir else None)
        if state != "done" and out_dir is not None:
            s.estimate_s = measured_seconds(s.kind, out_dir)
        out.stages.append(s)
    return out


def render(status: PipelineStatus) -> str:
    """A table: per stage kind, done / stale / remaining and the estimated time of the pending stages."""
    from benchmark.progress import format_duration

    rows = [f"{'stage':10s} {'done':>5s} {'stale':>6s} {'remaining':>10s} {'est. time':>10s}"]
    for kind, c in status.counts().items():
        pending = [s for s in status.pending() if s.kind == kind]
        measured = [s.estimate_s for s in pending if s.estimate_s is not None]
        est = format_duration(sum(measured)) if measured else ("-" if not pending else "?")
        rows.append(f"{kind:10s} {c['done']:5d} {c['stale']:6d} {c['remaining']:10d} {est:>10s}")
    total = {st: sum(c[st] for c in status.counts().values()) for st in STATES}
    rows.append(f"{'total':10s} {total['done']:5d} {total['stale']:6d} {total['remaining']:10d}")
    n_pending, missing = len(status.pending()), status.unmeasured()
    if not n_pending:
        rows.append("every stage is up to date")
    elif missing:
        names = ", ".join(sorted({s.kind for s in missing}))
        eta = "ETA unknown" if len(missing) == n_pending else f"ETA >= {format_duration(status.eta_s())}"
        rows.append(f"{eta} for {n_pending} pending stages ({len(missing)} without a measured time: {names})")
    else:
        rows.append(f"ETA {format_duration(status.eta_s())} for {n_pending} pending stages (one at a time)")
    return "\n".join(rows)
