"""Stage ``distill``: run one cell's method (in this process or in a container), then validate and record its set.

Outputs of a cell (``results/cells/<preset>/<ds>/<method>/b<budget>/s<seed>/``), all pure functions of the inputs:
``distilled.safetensors`` + ``distilled.json`` (the set; its meta holds the cell key and the tensors' sha256) and
``distill_log.jsonl`` (per-iteration losses and rates). Measurements of the machine (seconds, memory, runner) go
to ``distill.volatile.json`` and ``distill_log.volatile.jsonl``, which no hash depends on.
"""

from __future__ import annotations

import dataclasses
import logging
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmark.config import BenchConfig, GridConfig, budget_key
from benchmark.distilled import DistilledSet
from benchmark.experts.store import bytes_read_total
from benchmark.interface import CHECKPOINT_DIR, Checkpointer, DistillTask, JsonlLogger
from benchmark.io import read_json, write_json
from benchmark.registry import get_method
from benchmark.requirements import EXPERTS
from benchmark.stages.cells import Cell, file_digest, hash_json
from benchmark.stages.code_deps import code_digest
from benchmark.stages.context import StageContext
from benchmark.stages.experts import experts_digest
from benchmark.stages.prepare import check_prepared, prepared_digest

log = logging.getLogger(__name__)
OUTPUTS = ("distilled.safetensors", "distilled.json", "distill_log.jsonl")


def cell_inputs(ctx: StageContext, cell: Cell) -> tuple[type, dict[str, Any], list, str]:
    """(method class, resolved params, requirements, key): the key hashes everything the set depends on — the
    code that runs (stage and method), params, budget, seed, training data, student, and the content identity of
    experts and prepared artifacts."""
    cls = get_method(cell.method)
    params = ctx.cfg.cell_params(cell.method, cell.dataset, cell.budget)
    check_param_names(cls, ctx.cfg.profile, cell, params)
    reqs = cls.requirements(params, cell.budget)
    needs_experts = any(r.kind == EXPERTS for r in reqs)
    key = hash_json({"code": code_digest(("benchmark.stages.distill", cls.__module__)),
                     "method": cell.method, "params": params, "budget": cell.budget, "seed": cell.seed,
                     "data": ctx.data_id(cell.dataset), "student": asdict(ctx.student),
                     "experts": experts_digest(ctx, cell.dataset) if needs_experts else None,
                     "prepared": prepared_digest(check_prepared(ctx, cell.dataset, cell.method, reqs))})
    return cls, params, reqs, key


def check_param_names(cls: type, profile: str, cell: Cell, params: dict[str, Any]) -> None:
    """The cell's params name exactly the method's parameters (a typo or a stale params.yaml fails here)."""
    known = cls.default_params(profile, cell.dataset, cell.budget)
    where = f"params.yaml's methods.{cell.method}.{cell.dataset}.b{cell.budget}"
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"method {cell.method!r} has no parameter {unknown[0]!r} (in {where}); known: "
                         f"{sorted(known)}")
    missing = sorted(set(known) - set(params))
    if missing:
        raise ValueError(f"{where} lacks {missing}: rerun `mmdd init-params` to resolve every parameter")
    changed = {k: (known[k], params[k]) for k in sorted(known) if known[k] != params[k]}
    if changed:
        log.info("%s: params.yaml differs from the method's %s defaults in %s", cell, profile,
                 ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))


def make_task(ctx: StageContext, cell: Cell, work_dir: Path) -> tuple[Any, DistillTask]:
    """The method instance and its task; logs and checkpoints go to ``work_dir``."""
    cls, params, reqs, _ = cell_inputs(ctx, cell)
    train = ctx.train_data(cell.dataset)
    if cell.budget > train.n_pairs:
        raise ValueError(f"budget {cell.budget} exceeds the {train.n_pairs} training pairs of {cell.dataset}: "
                         "lower grid.budgets")
    experts = ctx.experts(cell.dataset) if any(r.kind == EXPERTS for r in reqs) else None
    logger = JsonlLogger(work_dir / "distill_log.jsonl", work_dir / "distill_log.volatile.jsonl")
    task = DistillTask(train=train, student=ctx.student, budget=cell.budget, seed=cell.seed, params=params,
                       device=ctx.device, experts=experts, logger=logger,
                       prepared=check_prepared(ctx, cell.dataset, cell.method, reqs),
                       checkpoint=Checkpointer(work_dir / CHECKPOINT_DIR, int(params.get("checkpoint_every", 0) or 0)),
                       dataset=cell.dataset)
    return cls(), task


def run_method(ctx: StageContext, cell: Cell, work_dir: Path) -> DistilledSet:
    """Run the method in this process and save its raw set to ``work_dir/distilled`` (no validation, no
    evaluation): what a container runner executes inside the container."""
    impl, task = make_task(ctx, cell, work_dir)
    if not task.checkpoint.exists():  # a fresh start: the log holds this run only (a resumed one keeps its records)
        task.logger.truncate(0)
    (work_dir / "distill_log.jsonl").touch()  # every cell has a (possibly empty) log: DVC declares it
    torch.manual_seed(cell.seed)
    t0, cpu0, read0 = time.perf_counter(), time.process_time(), bytes_read_total()
    dset = impl.distill(task)
    dset.meta.setdefault("volatile", {}).update(  # docs/reproducibility.md#cost-measurements
        seconds=time.perf_counter() - t0, cpu_seconds=time.process_time() - cpu0,
        expert_bytes_read=bytes_read_total() - read0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    dset.save(work_dir / "distilled")
    task.checkpoint.clear()
    return dset


def cell_config(cfg: BenchConfig, cell: Cell) -> BenchConfig:
    """``cfg`` narrowed to one cell: what the method's process is given (no other method's parameters)."""
    return dataclasses.replace(cfg, datasets=[cell.dataset],
                               grid=GridConfig([cell.method], [cell.budget], [cell.seed]),
                               methods={cell.method: {cell.dataset: {budget_key(cell.budget): cfg.cell_params(
                                   cell.method, cell.dataset, cell.budget)}}})


def run_elsewhere(ctx: StageContext, cell: Cell, cell_dir: Path, runner: str) -> DistilledSet:
    """Run the cell's method through a runner (``docker``: an isolated container that sees only the train split,
    the experts and the method's prepared artifacts); returns its raw set."""
    from benchmark.runners import get_runner
    from benchmark.runners.inputs import train_mounts
    from benchmark.runners.spec import CellSpec, SandboxLimits, config_document

    spec = CellSpec(cell.dataset, cell.method, cell.budget, cell.seed, device=str(ctx.device),
                    data_root=ctx.layout.data_root, work_dir=cell_dir,
                    config_doc=config_document(cell_config(ctx.cfg, cell), ctx.student.tower_config),
                    mounts=train_mounts(ctx.layout, cell.dataset, ctx.cfg.text_encoder, ctx.cfg.student.tower,
                                        cell.method),
                    limits=SandboxLimits.from_env(SandboxLimits.from_mapping(ctx.cfg.sandbox)))
    return get_runner(runner)(spec)


def is_current(cell_dir: Path, key: str) -> bool:
    """Every output exists, the set was made for ``key``, and its tensors are the bytes recorded with it."""
    if not all((cell_dir / name).is_file() for name in OUTPUTS):
        return False
    try:
        meta = read_json(cell_dir / "distilled.json").get("meta", {})
    except ValueError:
        return False
    return meta.get("cell_key") == key and meta.get("tensors_sha256") == file_digest(
        cell_dir / "distilled.safetensors")


def distill(ctx: StageContext, cell: Cell, force: bool = False, runner: str = "local") -> Path:
    """Distil one cell (``runner``: ``local`` or ``docker``), validate the set and record it in the cell dir."""
    _, params, _, key = cell_inputs(ctx, cell)
    cell_dir = ctx.cell_dir(cell)
    if not force and is_current(cell_dir, key):
        log.info("cell %s is up to date", cell)
        return cell_dir
    cell_dir.mkdir(parents=True, exist_ok=True)
    if runner == "local":
        dset = run_method(ctx, cell, cell_dir)
    else:
        dset = run_elsewhere(ctx, cell, cell_dir, runner)
    dset.validate(budget=cell.budget, image_shape=(3, ctx.image_size, ctx.image_size),
                  text_dim=ctx.student.text_dim)
    volatile = dict(dset.meta.pop("volatile", {}) or {}, runner=runner)
    for name in ("container_image", "container_image_id"):  # where it ran, not what it computed
        if name in dset.meta:
            volatile[name] = dset.meta.pop(name)
    dset.meta.update({"method": cell.method, "params": params, "budget": cell.budget, "seed": cell.seed,
                      "dataset": cell.dataset, "encoder": ctx.cfg.text_encoder, "tower": ctx.cfg.student.tower,
                      "temperature": ctx.student.temperature, "cell_key": key})
    st_path, js_path = dset.save(cell_dir / "distilled")
    doc = read_json(js_path)
    doc["meta"]["tensors_sha256"] = file_digest(st_path)
    write_json(js_path, doc)
    write_json(cell_dir / "distill.volatile.json", {**volatile, "pairs": dset.pairs, "bytes": dset.nbytes})
    log.info("%s: %d pairs, %d bytes, %.1f s", cell, dset.pairs, dset.nbytes, volatile.get("seconds") or 0.0)
    return cell_dir
