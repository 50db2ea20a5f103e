"""Stage ``report``: per dataset the tables (md/csv/tex: one per protocol, paired comparisons, tie-aware ranking,
the phased-teacher study), the figures and the synthetic-image grids under ``results/plots/<preset>/``;
``results/metrics/<preset>.json``; the preset's page ``results/<preset>.md`` and the index ``results/README.md``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark import report as rp
from benchmark.artifacts import (MethodStyle, StripItem, distill_curves_figure, method_styles, recall_vs_budget_figure,
                                 save_image_grid, seed_strip_figure)
from benchmark.distilled import DistilledSet
from benchmark.environment import environment_record
from benchmark.io import atomic_path, read_json, write_json
from benchmark.stages.cells import Cell, read_history
from benchmark.stages.context import StageContext

log = logging.getLogger(__name__)

# (test images, captions per image) of the published Karpathy test splits, for the chance level
TEST_SPLITS = {"flickr30k": (1000, 5), "coco": (5000, 5)}


@dataclass
class CellRun:
    """One evaluated grid cell: its metrics (with the degeneracy warnings added) and its distillation log."""

    cell: Cell
    metrics: dict[str, Any]
    history: list[dict[str, Any]]


def report(ctx: StageContext) -> dict[str, Any]:
    """Write every report file; returns the rendered markdown tables per dataset."""
    cfg, layout = ctx.cfg, ctx.layout
    plots_dir = layout.results_root / "plots" / cfg.preset
    published = rp.load_published()
    styles = method_styles(cfg.grid.methods)
    _log_settings(ctx)
    rendered, summary, sections = {}, {}, []
    for ds in cfg.datasets:
        runs = _cell_runs(ctx, ds)
        refs = rp.load_metrics(rp.reference_paths(layout.full_data(cfg.preset, ds)))
        rep = rp.build_dataset_report(ds, [r.metrics for r in runs], refs, cfg.grid.methods, cfg.report)
        rp.write_dataset_tables(rep, layout.tables(cfg.preset), published)
        rendered[ds] = rp.dataset_markdown(rep, published)
        summary[ds] = rp.summary_metrics(rep.rows + rep.references + rep.study_rows)
        plots = _figures(ctx, rep, runs, styles, plots_dir)
        rendered[ds] += _cross_arch(ctx, ds, runs, styles, plots_dir, plots) + _cost(ctx, ds, runs)
        sections.append(rp.DatasetSection(ds, rendered[ds], plots, _grids(ctx, ds, plots_dir / "grids")))
    write_json(layout.results_root / "metrics" / f"{cfg.preset}.json", summary)
    write_json(layout.results_root / "environment" / f"{cfg.preset}.json",
               environment_record(layout.results_root.parent))
    page = rp.preset_page(cfg.preset, len(cfg.grid.seeds), cfg.eval.students, cfg.eval.select, sections,
                          layout.results_root, cfg.role)
    _write_text(layout.results_root / f"{cfg.preset}.md", page)
    _write_text(layout.results_root / "README.md", rp.results_index(layout.results_root))
    return rendered


def _cross_arch(ctx: StageContext, ds: str, runs: list[CellRun], styles: dict[str, MethodStyle], plots_dir: Path,
                plots: list[Path]) -> str:
    """The cross-architecture table's files and figure (appended to ``plots``); its markdown section, or ''."""
    from benchmark import report_cross_arch as xa
    from benchmark.stages.cross_arch import cross_towers

    paths = [ctx.cell_dir(r.cell) / "cross_arch.json" for r in runs]
    t = xa.collect(ds, ctx.cfg.student.tower, [r.metrics for r in runs],
                   [read_json(p) for p in paths if p.exists()], ctx.cfg.grid.methods, cross_towers(ctx.cfg))
    if t is None:
        return ""
    xa.write_tables(t, ctx.layout.tables(ctx.cfg.preset))
    plots.append(xa.figure(t, styles, plots_dir / f"{ds}_cross_arch.png",
                           f"{ds}, {ctx.cfg.preset} preset: cross-architecture mean recall, 95% t interval over seeds"))
    links = ", ".join(f"[{name}](tables/{ctx.cfg.preset}/{ds}_cross_arch.{ext})"
                      for name, ext in (("markdown", "md"), ("CSV", "csv"), ("LaTeX", "tex")))
    return f"\n\n### Cross-architecture\n\n{rp.to_markdown(xa.table(t, rp.MD))}\n\nTables: {links}"


def _cost(ctx: StageContext, ds: str, runs: list[CellRun]) -> str:
    """Write the cost table to ``results/cost/<preset>/<ds>.{md,csv}`` (machine measurements: not a declared
    output, docs/reproducibility.md#cost-measurements); returns the page's link to it."""
    from benchmark import report_cost as rc
    from benchmark.registry import get_method
    from benchmark.requirements import EXPERTS

    g, preset = ctx.cfg.grid, ctx.cfg.preset
    experts = rc.dir_bytes(ctx.experts_dir(ds))
    rows = []
    for m in g.methods:
        for b in g.budgets:
            cells = [r for r in runs if r.cell.method == m and r.cell.budget == b]
            vols = [read_json(p) for r in cells if (p := ctx.cell_dir(r.cell) / "distill.volatile.json").exists()]
            reads = any(q.kind == EXPERTS for q in get_method(m).requirements(ctx.cfg.cell_params(m, ds, b), b))
            sizes = [r.metrics["bytes"] for r in cells if r.metrics.get("bytes") is not None]
            rows.append(rc.cost_row(m, b, vols, sizes, experts if reads else None,
                                    rc.dir_bytes(ctx.prepared_dir(ds, m))))
    machine = rc.machine_label(environment_record(ctx.layout.results_root.parent))
    rc.write_cost(ctx.layout.results_root / "cost" / preset, ds, rows, machine)
    return (f"\n\nDistillation cost per method (wall and CPU seconds, peak memory, storage; machine measurements "
            f"kept outside DVC's hashes): [cost/{preset}/{ds}.md](cost/{preset}/{ds}.md)")


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _log_settings(ctx: StageContext) -> None:
    s, methods = ctx.cfg.report, ctx.cfg.grid.methods
    for name in [*s.compare, *s.study]:
        if name not in methods:
            log.warning("report: %r (report.compare / report.study) is not in grid.methods %s: not reported", name,
                        methods)
    if s.baseline not in methods:
        log.warning("report: the baseline %r is not in grid.methods: no comparison against it", s.baseline)


def _cell_runs(ctx: StageContext, ds: str) -> list[CellRun]:
    cells = ctx.cells([ds])
    metrics = rp.load_metrics([ctx.cell_dir(c) / "metrics.json" for c in cells])
    runs = []
    for cell, m in zip(cells, metrics):
        d = ctx.cell_dir(cell)
        history = read_history(d)
        distilled = read_json(d / "distilled.json") if (d / "distilled.json").exists() else None
        runs.append(CellRun(cell, dict(m, warnings=rp.cell_warnings(distilled, history)), history))
    return runs


def chance_level(ctx: StageContext, ds: str) -> float | None:
    """Expected mean recall of random scores on the dataset's test split (None when its size is unknown)."""
    if ds == "shapes":
        sh = ctx.cfg.data.shapes
        return rp.chance_recall(sh.n_test, sh.captions_per_image)
    return rp.chance_recall(*TEST_SPLITS[ds]) if ds in TEST_SPLITS else None


def _figures(ctx: StageContext, rep: rp.DatasetReport, runs: list[CellRun], styles: dict[str, MethodStyle],
             plots_dir: Path) -> list[Path]:
    ds, p, preset = rep.dataset, rep.protocol, ctx.cfg.preset
    chance = chance_level(ctx, ds)
    refs = {r.method: r.values[rp.HEADLINE] for r in rep.references if r.protocol == p}
    out = [recall_vs_budget_figure(rp.budget_series(rep.rows, p), refs, chance, styles,
                                   plots_dir / f"{ds}_recall_vs_budget.png",
                                   f"{ds}, {preset} preset, {p} protocol: mean recall, 95% t interval over seeds")]
    out.append(seed_strip_figure(_strip_panels(rep.rows, rep.ranking, p), chance, styles,
                                 plots_dir / f"{ds}_seeds.png",
                                 f"{ds}, {preset} preset, {p} protocol: each seed (dots), mean and 95% t interval "
                                 "(bar); shaded bands alternate tie groups"))
    if rep.study_rows:
        out.append(seed_strip_figure(_strip_panels(rep.study_rows, rep.study_ranking, p), chance, styles,
                                     plots_dir / f"{ds}_study_seeds.png",
                                     f"{ds}, phased-teacher study, {p} protocol: seeds, mean and 95% t interval"))
    curves = _curve_panels(runs)
    if curves:
        out.append(distill_curves_figure(curves, styles, plots_dir / f"{ds}_distill_curves.png",
                                         f"{ds}, {preset} preset: distillation curves over all seeds"))
    return out


def _strip_panels(rows: list[rp.Row], ranking: dict[int, list], protocol: str) -> list[tuple[str, list[StripItem]]]:
    by_key = {(r.method, r.budget): r for r in rows if r.protocol == protocol}
    panels = []
    for b, ranked in ranking.items():
        items = [StripItem(x.method, by_key[(x.method, b)].per_seed[rp.HEADLINE],
                           by_key[(x.method, b)].values[rp.HEADLINE], x.rank, x.group) for x in ranked]
        if items:
            panels.append((f"{b} pairs", items))
    return panels


def _curve_panels(runs: list[CellRun]) -> list[tuple[str, dict[str, rp.Curve]]]:
    grouped: dict[int, dict[str, list[list[dict[str, Any]]]]] = {}
    for r in runs:
        if r.history:
            grouped.setdefault(r.cell.budget, {}).setdefault(r.cell.method, []).append(r.history)
    panels = []
    for b in sorted(grouped):
        curves = {m: c for m, hs in grouped[b].items() if (c := rp.seed_curve(hs)) is not None}
        if curves:
            panels.append((f"{b} pairs", curves))
    return panels


def _grids(ctx: StageContext, ds: str, out_dir: Path) -> list[tuple[str, Path]]:
    """The synthetic images of every method at the largest budget, first seed, with tiles of at least 64 px."""
    g = ctx.cfg.grid
    budget, seed = max(g.budgets), g.seeds[0]
    out = []
    for m in g.methods:
        stem = ctx.cell_dir(Cell(ds, m, budget, seed)) / "distilled"
        if stem.with_suffix(".safetensors").exists():
            images = torch.cat([p.images for p in DistilledSet.load(stem).phases])
            path = out_dir / f"{ds}_{m.replace('/', '_')}_b{budget}_s{seed}.png"
            out.append((m, save_image_grid(images, ctx.cfg.data.norm, path)))
    return out
