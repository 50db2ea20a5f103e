"""Tables over the grid: per dataset, rows method × budget, columns the retrieval metrics as mean ± std over seeds.

A cell's value is the mean over its evaluation students; the ± is the sample std of those cell values over seeds
(for a row with a single cell, such as the full-data reference, the std over its students).
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from benchmark.io import atomic_path, read_json

COLUMNS = (("ir1", "IR@1"), ("ir5", "IR@5"), ("ir10", "IR@10"), ("tr1", "TR@1"), ("tr5", "TR@5"), ("tr10", "TR@10"),
           ("r_mean", "mean"))


@dataclass
class Row:
    method: str
    budget: int | None
    protocol: str
    seeds: list[int]
    values: dict[str, tuple[float, float]]  # metric -> (mean, std over seeds)


def collect_rows(metrics: list[dict[str, Any]]) -> list[Row]:
    """Group cell metrics (as written by the evaluate stage) by (method, budget, protocol)."""
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
    for m in metrics:
        for protocol, summary in m["protocols"].items():
            groups.setdefault((m["method"], m.get("budget"), protocol), []).append(dict(summary, seed=m.get("seed", 0)))
    rows = []
    for (method, budget, protocol), cells in sorted(groups.items(), key=lambda kv: (kv[0][2] != "strict",)):
        values = {}
        for key, _ in COLUMNS:
            per_seed = [c[key]["mean"] for c in cells]
            if len(per_seed) > 1:
                values[key] = (statistics.fmean(per_seed), statistics.stdev(per_seed))
            else:  # a single cell (e.g. the full-data row): the spread over its evaluation students
                values[key] = (per_seed[0], cells[0][key]["std"])
        rows.append(Row(method, budget, protocol, sorted(c.get("seed", 0) for c in cells), values))
    return rows


def _fmt(mean: float, std: float) -> str:
    return f"{mean:.1f} ± {std:.1f}"


def render(rows: list[Row], fmt: str = "github") -> str:
    """A table in a tabulate format (``github`` markdown, ``latex_booktabs``, ...)."""
    headers = ["method", "pairs", "protocol", "seeds", *[h for _, h in COLUMNS]]
    body = [[r.method, "all" if r.budget is None else r.budget, r.protocol, len(r.seeds),
             *[_fmt(*r.values[k]) for k, _ in COLUMNS]] for r in rows]
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)


def to_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["method", "pairs", "protocol", "n_seeds", *[f"{k}_{s}" for k, _ in COLUMNS for s in ("mean", "std")]])
    for r in rows:
        w.writerow([r.method, "" if r.budget is None else r.budget, r.protocol, len(r.seeds),
                    *[f"{v:.4f}" for k, _ in COLUMNS for v in r.values[k]]])
    return buf.getvalue()


def write_tables(rows: list[Row], out_dir: Path, stem: str) -> list[Path]:
    """Write ``stem.md``, ``stem.csv`` and ``stem.tex`` atomically."""
    out = []
    for suffix, text in ((".md", render(rows) + "\n"), (".csv", to_csv(rows)), (".tex", render(rows, "latex_booktabs")
                                                                                 + "\n")):
        path = out_dir / f"{stem}{suffix}"
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        out.append(path)
    return out


def load_metrics(paths: list[Path]) -> list[dict[str, Any]]:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} grid cells have no metrics yet (first: {missing[0]}): run "
                                "`mmdd evaluate` for them")
    return [read_json(p) for p in paths]


PUBLISHED_CSV = Path(__file__).with_name("published") / "published_results.csv"


def load_published(path: Path = PUBLISHED_CSV) -> dict[tuple[str, str, int | None, str], tuple[float, float | None]]:
    """(dataset, method, pairs, metric) -> (value, std or None) from the published-results data file."""
    out = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            pairs = int(r["pairs"]) if r["pairs"] else None
            out[(r["dataset"], r["method"], pairs, r["metric"])] = (float(r["value"]),
                                                                     float(r["std"]) if r["std"] else None)
    return out


def render_with_published(rows: list[Row], dataset: str, fmt: str = "github",
                          published: dict | None = None) -> str:
    """Like :func:`render`, with the published value in brackets where the papers report this cell."""
    published = load_published() if published is None else published
    headers = ["method", "pairs", "protocol", "seeds", *[h for _, h in COLUMNS]]
    body = []
    for r in rows:
        cells = []
        for key, _ in COLUMNS:
            text = _fmt(*r.values[key])
            pub = published.get((dataset, r.method, r.budget, key)) if r.protocol == "paper" else None
            if pub is not None:
                text += f" [{pub[0]:.1f}" + (f" ± {pub[1]:.1f}]" if pub[1] is not None else "]")
            cells.append(text)
        body.append([r.method, "all" if r.budget is None else r.budget, r.protocol, len(r.seeds), *cells])
    return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)


def plot_recall_vs_budget(rows: list[Row], path: Path, title: str = "") -> Path:
    """r_mean (mean ± std over seeds) against the budget, one line per method; full data as a dashed line."""
    from benchmark.artifacts import pyplot, save_figure

    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    for method in dict.fromkeys(r.method for r in rows if r.budget is not None):
        pts = sorted((r.budget, *r.values["r_mean"]) for r in rows if r.method == method and r.budget is not None)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], label=method, marker="o",
                    capsize=3, lw=1.2)
    for r in rows:
        if r.budget is None:
            ax.axhline(r.values["r_mean"][0], ls="--", color="k", lw=1, label=f"{r.method}")
    ax.set_xlabel("pairs (budget)")
    ax.set_ylabel("mean recall (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return save_figure(fig, path)


def plot_distill_curves(curves: dict[str, list[dict[str, float]]], path: Path, title: str = "") -> Path | None:
    """Matching-loss curves (one per method, logged key ``match_loss``) of one budget and seed; None when no
    method logged one."""
    curves = {k: [r for r in v if "match_loss" in r] for k, v in curves.items()}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    from benchmark.artifacts import line_plot

    series = {name: ([r["step"] for r in hist], [r["match_loss"] for r in hist]) for name, hist in curves.items()}
    return line_plot(series, path, "iteration", "matching loss", title)


def summary_metrics(rows: list[Row]) -> dict[str, dict[str, float]]:
    """``{"<method>/b<pairs>": {"r_mean": ..., "r_mean_std": ..., ...}}`` for ``dvc metrics show``."""
    out = {}
    for r in rows:
        key = f"{r.method}/b{'all' if r.budget is None else r.budget}/{r.protocol}"
        out[key] = {k: round(v[0], 3) for k, v in r.values.items()} | {
            f"{k}_std": round(v[1], 3) for k, v in r.values.items()}
    return out


def results_readme(preset: str, n_seeds: int, n_students: int, select: str,
                   sections: list[tuple[str, str, list[Path], list[tuple[str, Path]]]], root: Path) -> str:
    """The text of ``results/README.md``: per dataset its table, plots, synthetic-set grids and table files."""
    lines = [f"# Results: `{preset}` preset", "",
             "Generated by the `report` stage (`mmdd report`); do not edit. Each value is the mean ± std over "
             f"{n_seeds} distillation seeds of the mean over {n_students} evaluation students. Protocol `strict` "
             f"(select `{select}`) never looks at test before the final read; `paper` is the published "
             "best-of-test-evaluations protocol, shown only to compare with the papers, whose numbers (where they "
             "have the cell) are in [brackets] on those rows. The environment that computed them (versions, torch's "
             f"CPU kernels, threads): [environment/{preset}.json](environment/{preset}.json).", ""]
    for ds, md, plots, grids in sections:
        lines += [f"## {ds}", "", md, "",
                  *[f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in plots], "",
                  "Synthetic sets at the largest budget (seed 0): " + ", ".join(
                      f"[{m}]({g.relative_to(root).as_posix()})" for m, g in grids if g.exists()), "",
                  f"Tables: [markdown](tables/{preset}/{ds}.md), [CSV](tables/{preset}/{ds}.csv),"
                  f" [LaTeX](tables/{preset}/{ds}.tex)", ""]
    return "\n".join(lines) + "\n"
