"""Stage ``full-data``: the upper reference row — students trained on every training pair."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from benchmark.evaluation import evaluate_full_data
from benchmark.io import read_json, write_json
from benchmark.stages.cells import hash_json
from benchmark.stages.context import StageContext
from benchmark.stages.evaluate import split_id


def full_data(ctx: StageContext, ds: str, force: bool = False) -> dict[str, Any]:
    """``results/cells/<preset>/<ds>/full-data/metrics.json`` (wall time in ``full_data.volatile.json``)."""
    out_dir = ctx.layout.full_data(ctx.cfg.preset, ds)
    fd = ctx.cfg.full_data
    key = hash_json({"data": ctx.data_id(ds), "eval": asdict(ctx.cfg.eval), "full": asdict(fd),
                     "student": asdict(ctx.student), "test": split_id(ctx, ds, "test")})
    out_path = out_dir / "metrics.json"
    if not force and out_path.exists() and read_json(out_path).get("key") == key:
        return read_json(out_path)
    train = ctx.train_data(ds)
    t0 = time.perf_counter()
    res = evaluate_full_data(train, ctx.student, ctx.cfg.eval, ctx.eval_split(ds, "test"), fd.lr, fd.epochs,
                             ctx.device, ctx.progress)
    res.update({"key": key, "method": "full-data", "pairs": train.n_pairs, "dataset": ds})
    write_json(out_path, res)
    write_json(out_dir / "full_data.volatile.json", {"seconds": time.perf_counter() - t0})
    return res
