"""Stage ``full-data``: the reference rows — what training on every pair reaches, measured like-for-like.

Writes into ``results/cells/<preset>/<ds>/full-data/`` one metrics file per reference (same schema as a cell's
``metrics.json``; each a single run, so its ± is over evaluation students or over experts, and tables say so):

* ``metrics.json`` — ``full-data``: students trained with the evaluation optimiser (momentum, weight decay, lr drop)
  for ``full_data.epochs`` at ``full_data.lr``;
* ``metrics_teacher_sgd.json`` — ``full-data (teacher SGD)``: students trained exactly as the experts are (their
  lr, momentum, weight decay, batch size and epochs; no lr drop), from the evaluation students' seeds;
* ``metrics_expert_final.json`` — ``expert @ epoch E``: the experts themselves at their final epoch;
* ``metrics_expert_e<k>.json`` — ``expert @ epoch k`` for each of ``full_data.expert_epochs`` (e.g. the latest
  target epoch matched by the raw-teacher methods).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmark.evaluation import EvalConfig, evaluate_experts, evaluate_full_data
from benchmark.io import read_json, write_json
from benchmark.stages.cells import hash_json
from benchmark.stages.code_deps import code_digest
from benchmark.stages.context import StageContext
from benchmark.stages.evaluate import split_id


def teacher_eval_config(ctx: StageContext) -> EvalConfig:
    """The evaluation settings with the experts' optimiser and batch size (no lr drop)."""
    ex = ctx.cfg.experts
    return replace(ctx.cfg.eval, momentum=ex.momentum, weight_decay=ex.weight_decay, batch_size=ex.batch_size,
                   lr_drop=False)


def _cached(path: Path, key: str) -> dict[str, Any] | None:
    if path.exists():
        doc = read_json(path)
        if doc.get("key") == key:
            return doc
    return None


def full_data(ctx: StageContext, ds: str, force: bool = False) -> dict[str, Any]:
    """Write every reference row of ``ds``; returns the harness's own full-data metrics (``metrics.json``)."""
    out_dir = ctx.layout.full_data(ctx.cfg.preset, ds)
    fd, ex = ctx.cfg.full_data, ctx.cfg.experts
    base = {"code": code_digest(("benchmark.stages.full_data",)), "data": ctx.data_id(ds),
            "student": asdict(ctx.student), "test": split_id(ctx, ds, "test")}
    common = {"pairs": None, "dataset": ds, "reference": True}
    seconds: dict[str, float] = {}

    def run(name: str, method: str, key_doc: dict[str, Any], compute) -> dict[str, Any]:
        path = out_dir / name
        key = hash_json({**base, **key_doc})
        res = None if force else _cached(path, key)
        if res is None:
            t0 = time.perf_counter()
            res = compute()
            seconds[name] = time.perf_counter() - t0
            res.update(common, key=key, method=method, pairs=ctx.train_data(ds).n_pairs)
            write_json(path, res)
        return res

    test = ctx.eval_split(ds, "test")
    own = run("metrics.json", "full-data", {"eval": asdict(ctx.cfg.eval), "full": asdict(fd)},
              lambda: evaluate_full_data(ctx.train_data(ds), ctx.student, ctx.cfg.eval, test, fd.lr, fd.epochs,
                                         ctx.device, ctx.progress))
    tcfg = teacher_eval_config(ctx)
    run("metrics_teacher_sgd.json", "full-data (teacher SGD)", {"eval": asdict(tcfg), "experts": asdict(ex)},
        lambda: evaluate_full_data(ctx.train_data(ds), ctx.student, tcfg, test, ex.lr_img, ex.epochs, ctx.device,
                                   ctx.progress, lr_txt=ex.lr_txt))
    experts_id = {"experts": ctx.expert_config_hash(ds), "num_experts": ex.num_experts}
    collection = ctx.experts(ds)
    final = collection[0].num_timestamps - 1
    for epoch, name in [(final, "metrics_expert_final.json"),
                        *[(e, f"metrics_expert_e{e}.json") for e in fd.expert_epochs]]:
        if epoch > final:
            raise ValueError(f"full_data.expert_epochs asks for epoch {epoch} but the experts have {final} epochs: "
                             "lower it or raise experts.epochs")
        run(name, f"expert @ epoch {epoch}", {**experts_id, "epoch": epoch},
            lambda epoch=epoch: evaluate_experts([(e.read("img", epoch), e.read("txt", epoch)) for e in collection],
                                                 ctx.student, test, ctx.device))
    if seconds:
        write_json(out_dir / "full_data.volatile.json", {"seconds": seconds})
    return own
