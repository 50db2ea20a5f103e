"""Stage ``report``: tables (md/csv/tex, published numbers beside ours), plots, ``results/metrics/<preset>.json``
and ``results/README.md`` over the whole grid."""

from __future__ import annotations

from typing import Any

from benchmark import report as rp
from benchmark.environment import environment_record
from benchmark.io import atomic_path, write_json
from benchmark.stages.cells import Cell, read_history
from benchmark.stages.context import StageContext


def report(ctx: StageContext) -> dict[str, Any]:
    """Write every report file; returns the rendered markdown table per dataset."""
    cfg, layout = ctx.cfg, ctx.layout
    tables_dir = layout.tables(cfg.preset)
    plots_dir = layout.results_root / "plots" / cfg.preset
    rendered, summary, sections = {}, {}, []
    g = cfg.grid
    for ds in cfg.datasets:
        rows = rp.collect_rows(rp.load_metrics([ctx.cell_dir(c) / "metrics.json" for c in ctx.cells([ds])]))
        full = layout.full_data(cfg.preset, ds) / "metrics.json"
        if full.exists():
            rows += rp.collect_rows(rp.load_metrics([full]))
        rp.write_tables(rows, tables_dir, ds)
        md = rp.render_with_published(rows, ds)
        with atomic_path(tables_dir / f"{ds}.md") as tmp:
            tmp.write_text(md + "\n")
        rendered[ds] = md
        summary[ds] = rp.summary_metrics(rows)
        plots = [rp.plot_recall_vs_budget([r for r in rows if r.protocol == "strict"],
                                          plots_dir / f"{ds}_recall_vs_budget.png",
                                          f"{ds}, {cfg.preset} preset, strict protocol")]
        budget, seed = max(g.budgets), g.seeds[0]
        curves = {m: read_history(ctx.cell_dir(Cell(ds, m, budget, seed))) for m in g.methods}
        curve = rp.plot_distill_curves(curves, plots_dir / f"{ds}_distill_curves.png",
                                       f"{ds}, {budget} pairs, seed {seed}")
        plots += [curve] if curve else []
        grids = [(m, ctx.cell_dir(Cell(ds, m, budget, seed)) / "artifacts" / "images.png") for m in g.methods]
        sections.append((ds, md, plots, grids))
    write_json(layout.results_root / "metrics" / f"{cfg.preset}.json", summary)
    write_json(layout.results_root / "environment" / f"{cfg.preset}.json",
               environment_record(layout.results_root.parent))
    text = rp.results_readme(cfg.preset, len(g.seeds), cfg.eval.students, cfg.eval.select, sections,
                             layout.results_root)
    with atomic_path(layout.results_root / "README.md") as tmp:
        tmp.write_text(text)
    return rendered
