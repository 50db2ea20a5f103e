"""Stage ``prepare``: build what a method's requirements ask for, generically.

For one (dataset, method), the requirements of every budget in the grid are collected from the method's own
resolved params; each one other than the shared experts is built by the artifact kind registered for it into
``data/prepared/<ds>/<method>/<requirement id>/``. A ``manifest.json`` records what was built from which experts
(whose digest includes the training data's identity), so ``distill`` can refuse artifacts of another expert set or
dataset. Builders get the training pairs only when their kind declares ``needs_train_data``,
and then only the train split (loaded lazily: a builder whose files are current never loads it).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from benchmark.io import read_json, write_json
from benchmark.registry import get_method
from benchmark.requirements import ArtifactKind, BuildContext, Requirement, get_artifact_kind, prepared_kinds
from benchmark.stages.context import StageContext
from benchmark.stages.experts import experts_digest

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


def method_requirements(ctx: StageContext, ds: str, method: str) -> list[Requirement]:
    """Everything ``method`` needs on ``ds`` over the grid's budgets, in order, without repeats."""
    cls = get_method(method)
    out: list[Requirement] = []
    for b in ctx.cfg.grid.budgets:
        for r in cls.requirements(ctx.cfg.cell_params(method, ds, b), b):
            if r not in out:
                out.append(r)
    return out


def build_context(ctx: StageContext, ds: str, kind: ArtifactKind, out_dir: Path) -> BuildContext:
    """What a builder of ``kind`` may read on ``ds``: the experts, the student config, the device and — only when
    the kind declares ``needs_train_data`` — a lazy loader of the TRAINING pairs and their identity."""
    wants = kind.needs_train_data
    return BuildContext(ctx.experts_dir(ds), out_dir, ctx.progress, student=ctx.student, device=str(ctx.device),
                        load_train=(lambda: ctx.train_data(ds)) if wants else None,
                        train_id=ctx.data_id(ds) if wants else None)


def prepare(ctx: StageContext, ds: str, method: str) -> dict[str, Any]:
    """Build the method's prepared artifacts on ``ds``; returns the manifest."""
    reqs = prepared_kinds(method_requirements(ctx, ds, method))
    root = ctx.prepared_dir(ds, method)
    root.mkdir(parents=True, exist_ok=True)
    experts = experts_digest(ctx, ds) if reqs else None
    built = []
    for req in reqs:
        kind = get_artifact_kind(req.kind)
        summary = kind.build(req, build_context(ctx, ds, kind, root / req.id))
        log.info("%s/%s: prepared %s", ds, method, req.id)
        built.append({**req.to_json(), "summary": summary})
    keep = {r.id for r in reqs} | {MANIFEST}
    for stale in root.iterdir():
        if stale.name not in keep:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    manifest = {"dataset": ds, "method": method, "experts": experts, "artifacts": built}
    write_json(root / MANIFEST, manifest)
    return manifest


def check_prepared(ctx: StageContext, ds: str, method: str, reqs: list[Requirement]) -> Path | None:
    """The method's prepared root, verified to hold ``reqs`` built from the current experts and training data (None
    if nothing is prepared for it)."""
    reqs = prepared_kinds(reqs)
    if not reqs:
        return None
    root = ctx.prepared_dir(ds, method)
    path = root / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{method} needs {[r.id for r in reqs]} but {root} holds no prepared artifacts: "
                                f"run `mmdd prepare --method {method} --dataset {ds}`")
    manifest = read_json(path)
    have = {a["id"] for a in manifest.get("artifacts", [])}
    missing = [r.id for r in reqs if r.id not in have]
    if missing or manifest.get("experts") != experts_digest(ctx, ds):
        why = f"missing {missing}" if missing else "built from another expert set or training data"
        raise ValueError(f"prepared artifacts in {root} do not fit ({why}): rerun "
                         f"`mmdd prepare --method {method} --dataset {ds}`")
    return root


def prepared_digest(root: Path | None) -> str | None:
    """Identity of a prepared root (its manifest's content) for cache keys."""
    if root is None:
        return None
    from benchmark.stages.cells import file_digest

    return file_digest(Path(root) / MANIFEST)
