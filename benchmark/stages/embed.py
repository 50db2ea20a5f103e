"""Stage ``embed``: caption features of every split with the frozen text encoder."""

from __future__ import annotations

from pathlib import Path

from benchmark.constants import SPLITS
from benchmark.stages.context import StageContext


def embed(ctx: StageContext, ds: str) -> list[Path]:
    """``data/features/<ds>/<encoder>/<split>.safetensors`` for train, val and test."""
    from benchmark.encoders.text import embed_split

    from benchmark.stages.code_deps import code_digest

    ctx.check_raw(ds)
    code = code_digest(("benchmark.stages.embed",))
    return [embed_split(ctx.caption_split(ds, s), ctx.features_path(ds, s), ctx.cfg.text_encoder, str(ctx.device),
                        progress=ctx.progress, code=code) for s in SPLITS]
