"""Stage ``fetch``: generate (``shapes``) or download and verify a dataset into ``data/raw/<ds>``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from benchmark.data.datasets import get_dataset_info
from benchmark.stages.context import StageContext


def fetch(ctx: StageContext, ds: str) -> Path:
    """The dataset's raw annotations and images (idempotent: a complete, verified copy is kept)."""
    get_dataset_info(ds)
    if ds == "shapes":
        from benchmark.data.shapes import generate_shapes

        return generate_shapes(ctx.layout.dataset_dir(ds), **asdict(ctx.cfg.data.shapes))
    from benchmark.data.fetch import fetch_dataset

    return fetch_dataset(ds, ctx.layout.raw_root, progress=ctx.progress, **ctx.cfg.data.sources.get(ds, {}))
