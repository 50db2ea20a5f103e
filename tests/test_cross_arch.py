"""Cross-architecture evaluation (docs/protocols.md#cross-architecture-evaluation): config validation at the edge,
the resize rule, the stage (real tiny pipeline), its DVC stage, and the report's table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from benchmark.cross_arch import HEADS, resize_images, resolved_towers, CrossArchConfig
from benchmark.params import resolve
from benchmark.stages.cells import Cell
from helpers import tiny_context

CELL = Cell("shapes", "random", 10, 0)
XA = ["grid.methods=[random]", "grid.budgets=[10]", "grid.seeds=[0]", "cross_arch.students=1"]


@pytest.mark.parametrize(("override", "message"), [
    ("cross_arch.towers=[resnet_nope]", r"cross_arch.towers: unknown tower 'resnet_nope'.*benchmark/models/configs"),
    ("cross_arch.towers=[resnet10t_32,resnet10t_32]", "cross_arch.towers lists a name twice"),
    ("cross_arch.students=0", "cross_arch.students must be a positive integer"),
    ("cross_arch.methods=[lors]", r"cross_arch.methods: \['lors'\] not in grid.methods"),
    ("cross_arch.towers=[convnet_w8_d2_16px]", "the student tower the sets are distilled with"),
])
def test_bad_cross_arch_settings_name_the_field_and_the_fix(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve("tiny", ["grid.methods=[random]", override])


def test_heads_is_added_when_a_method_distils_for_it() -> None:
    cfg = CrossArchConfig(towers=["resnet10t_32"])
    assert resolved_towers(cfg, [{"student": "full"}]) == ["resnet10t_32"]
    assert resolved_towers(cfg, [{"student": "full"}, {"student": HEADS}]) == ["resnet10t_32", HEADS]
    assert resolved_towers(CrossArchConfig(towers=[HEADS]), [{"student": HEADS}]) == [HEADS]


def test_resize_rule_bilinear_antialiased() -> None:
    x = torch.randn(2, 3, 16, 16)
    assert resize_images(x, 16) is x
    assert torch.allclose(resize_images(torch.full((1, 3, 16, 16), 0.3), 32), torch.full((1, 3, 32, 32), 0.3))
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2 * 2.0 - 1  # +-1 checkerboard
    small = resize_images(checker.expand(1, 3, 16, 16).contiguous(), 5)
    assert small.abs().max() < 0.35  # antialiasing averages the pattern away instead of sampling it


@pytest.fixture
def root(tiny_project, tmp_path) -> Path:
    shutil.copytree(tiny_project[0] / "data", tmp_path / "data")
    return tmp_path


def test_stage_writes_a_pure_cached_result_per_tower(root: Path) -> None:
    from benchmark.stages.cross_arch import cross_arch, frozen_encoder
    from benchmark.stages.distill import distill

    ctx = tiny_context(root, [*XA, f"cross_arch.towers=[resnet10t_32,{HEADS}]"])
    cell_dir = distill(ctx, CELL)
    res = cross_arch(ctx, CELL)
    assert list(res["towers"]) == ["resnet10t_32", HEADS]
    r = res["towers"]["resnet10t_32"]
    assert r["image_size"] == 32 and r["resized"] and list(r["protocols"]) == ["strict"]
    assert len(r["protocols"]["strict"]["students"]) == 1 and 0 <= r["protocols"]["strict"]["r_mean"]["mean"] <= 100
    assert not (cell_dir / "metrics.json").exists()  # the evaluate stage is not involved
    out = cell_dir / "cross_arch.json"
    stamp, text = out.stat().st_mtime_ns, out.read_text()
    assert cross_arch(ctx, CELL) == res and out.stat().st_mtime_ns == stamp  # cached on its key
    assert cross_arch(ctx, CELL, force=True) == res and out.read_text() == text  # recomputed: the same bytes
    assert "seconds" in json.loads((cell_dir / "cross_arch.volatile.json").read_text())
    # the heads family's frozen encoder is expert 0's image tower at its last epoch
    enc, width = frozen_encoder(ctx, "shapes")
    e0 = ctx.experts("shapes")[0]
    assert torch.equal(torch.nn.utils.parameters_to_vector(enc.parameters()), e0.read("img", e0.num_timestamps - 1))
    assert not any(p.requires_grad for p in enc.parameters())
    other = tiny_context(root, [*XA, "cross_arch.towers=[convnet_w64_d4]"])
    assert list(cross_arch(other, CELL)["towers"]) == ["convnet_w64_d4"]  # another tower list: recomputed


def test_stage_refuses_without_towers_or_for_other_methods(root: Path) -> None:
    from benchmark.stages.cross_arch import cross_arch

    with pytest.raises(ValueError, match="cross_arch.towers is empty"):
        cross_arch(tiny_context(root, XA), CELL)
    ctx = tiny_context(root, ["grid.methods=[random,herding]", "cross_arch.towers=[resnet10t_32]",
                              "cross_arch.methods=[herding]"])
    with pytest.raises(ValueError, match="not in cross_arch.methods"):
        cross_arch(ctx, CELL)


def test_dvc_stage_is_added_without_changing_the_other_stages() -> None:
    from benchmark.stages.graph import render

    root = Path(__file__).resolve().parents[1]
    base = render(resolve("tiny", XA), root)["stages"]
    with_xa = render(resolve("tiny", [*XA, f"cross_arch.towers=[resnet10t_32,{HEADS}]"]), root)["stages"]
    assert "cross-arch" not in base and {k: v for k, v in with_xa.items() if k != "cross-arch"} == base
    st = with_xa["cross-arch"]
    assert st["matrix"]["method"] == "${grid.methods}" and st["outs"] == [
        "results/cells/${preset}/${item.dataset}/${item.method}/b${item.budget}/s${item.seed}/cross_arch.json"]
    assert "benchmark/models/configs/resnet10t_32.json" in st["deps"] and "data/experts/${item.dataset}" in st["deps"]
    assert "benchmark/stages/cross_arch.py" in st["deps"] and "cross_arch" in st["params"]
    only = render(resolve("tiny", ["grid.methods=[random,herding]", "cross_arch.towers=[resnet10t_32]",
                                   "cross_arch.methods=[herding]"]), root)["stages"]["cross-arch"]
    assert only["matrix"]["method"] == "${cross_arch.methods}" and "data/experts/${item.dataset}" not in only["deps"]


def _record(method: str, seed: int, values: dict[str, float]) -> dict:
    return {"method": method, "budget": 10, "seed": seed, "dataset": "shapes",
            "towers": {t: {"protocols": {"strict": {"r_mean": {"mean": v}}}} for t, v in values.items()}}


def test_report_table_has_t_intervals_over_seeds_and_the_source_column(tmp_path: Path) -> None:
    from benchmark import report_cross_arch as xa
    from benchmark.report import MD, TEX, to_latex, to_markdown
    from benchmark.stats import t_interval

    cross = [_record("lors", s, {"resnet10t_32": 5.0 + s, HEADS: 20.0 + 2 * s}) for s in range(3)]
    cross += [_record("repblend", s, {"resnet10t_32": 4.0, HEADS: 40.0 + s}) for s in range(3)]
    main = [{"method": m, "budget": 10, "seed": s, "protocols": {"strict": {"r_mean": {"mean": 10.0 + s}}}}
            for m in ("lors", "repblend") for s in range(3)]
    t = xa.collect("shapes", "convnet_w32_d3", main, cross, ["random", "lors", "repblend"], ["resnet10t_32", HEADS])
    assert t.towers == ["convnet_w32_d3", "resnet10t_32", HEADS] and t.methods == ["lors", "repblend"]
    iv = t.values[("repblend", 10)][HEADS]
    want = t_interval([40.0, 41.0, 42.0])
    assert (iv.mean, iv.half_width) == (want.mean, want.half_width) and iv.n == 3
    md = to_markdown(xa.table(t, MD))
    assert "convnet_w32_d3*" in md and f"41.0 ± {want.half_width:.1f}" in md
    assert to_latex(xa.table(t, TEX)).isascii()
    paths = xa.write_tables(t, tmp_path)
    assert [p.name for p in paths] == ["shapes_cross_arch.md", "shapes_cross_arch.csv", "shapes_cross_arch.tex"]
    rows = paths[1].read_text().splitlines()
    assert rows[0] == "method,pairs,tower,source,n_seeds,r_mean,lo,hi" and len(rows) == 1 + 6
    assert xa.figure(t, {}, tmp_path / "x.png", "t").stat().st_size > 0
    assert xa.collect("shapes", "convnet_w32_d3", main, [], ["lors"]) is None
