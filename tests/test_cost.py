"""Cost measurements (docs/reproducibility.md#cost-measurements): the distill stage records CPU seconds, peak memory
and the expert bytes a method read in its volatile record only; the report's cost table lives outside DVC's outputs."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from benchmark.stages.cells import Cell
from helpers import tiny_context


@pytest.fixture
def root(tiny_project, tmp_path) -> Path:
    shutil.copytree(tiny_project[0] / "data", tmp_path / "data")
    return tmp_path


def test_expert_reads_are_counted_in_tensor_bytes(root: Path) -> None:
    from benchmark.experts.store import bytes_read_total

    ctx = tiny_context(root)
    expert = ctx.experts("shapes")[0]
    before = bytes_read_total()
    a = expert.read("img", 1)
    b = expert.read("img", 1)  # the second read (already verified) counts too: it is read again
    t = expert.read("txt", 0)
    assert bytes_read_total() - before == 2 * a.numel() * 4 + t.numel() * 4 == a.nbytes + b.nbytes + t.nbytes


def test_distill_records_cost_only_in_the_volatile_record(root: Path) -> None:
    from benchmark.stages.distill import distill

    ctx = tiny_context(root, ["grid.methods=[random,tesla-vl]", "grid.budgets=[10]", "grid.seeds=[0]"])
    vols = {}
    for m in ("random", "tesla-vl"):
        cell_dir = distill(ctx, Cell("shapes", m, 10, 0))
        vols[m] = json.loads((cell_dir / "distill.volatile.json").read_text())
        meta = json.loads((cell_dir / "distilled.json").read_text())["meta"]
        assert not {"cpu_seconds", "expert_bytes_read", "peak_rss_mb", "volatile"} & set(meta)  # hashed: none
    assert vols["random"]["expert_bytes_read"] == 0
    tesla = vols["tesla-vl"]
    assert tesla["expert_bytes_read"] > 0 and tesla["cpu_seconds"] > 0 and tesla["peak_rss_mb"] > 0
    # the process-wide count equals the matching engine's own account of what its teachers read
    meta = json.loads((ctx.cell_dir(Cell("shapes", "tesla-vl", 10, 0)) / "distilled.json").read_text())["meta"]
    assert tesla["expert_bytes_read"] == meta["stats"]["teacher_bytes_read"]


def test_cost_table_is_written_outside_the_tracked_outputs(root: Path) -> None:
    from benchmark import report_cost as rc
    from benchmark.params import resolve
    from benchmark.stages.graph import render

    rows = [rc.cost_row("lors", 100, [{"seconds": 2.0, "cpu_seconds": 3.0, "peak_rss_mb": 100.0,
                                       "expert_bytes_read": 1000}, {"seconds": 4.0, "cpu_seconds": 5.0}],
                        [400, 400], 5000, None),
            rc.cost_row("random", 100, [], [], None, None)]
    assert rows[0].measured == {"seconds": 3.0, "cpu_seconds": 4.0, "peak_rss_mb": 100.0, "expert_bytes_read": 1000.0}
    # over two seeds: the 95 % t half-width is t(0.975, 1) * s / sqrt(2) = 12.706 * |2 - 4| / 2
    assert rows[0].half_width["seconds"] == pytest.approx(12.7062047, rel=1e-6)
    assert rows[0].half_width["peak_rss_mb"] is None  # one measured cell: no interval
    md, csv = rc.write_cost(root / "results" / "cost" / "tiny", "shapes", rows, "a test machine")
    text = md.read_text()
    assert "a test machine" in text and re.search(r"\| lors +\| +100 \| +2 \| +3\.0 ± 12\.7 \|", text)
    assert "shared" in text
    assert "5.00 kB" in text
    assert csv.read_text().splitlines()[1].startswith("lors,100,2,3,4,100,1000,12.7062,12.7062,,,400,5000,")
    report = render(resolve("tiny"), Path(__file__).resolve().parents[1])["stages"]["report"]
    declared = json.dumps([report["outs"], report["metrics"], report["plots"]])
    assert "results/cost" not in declared and "results/tables" in declared  # never a declared (hashed) output
    assert "/results/cost/" in (Path(__file__).resolve().parents[1] / ".gitignore").read_text()
