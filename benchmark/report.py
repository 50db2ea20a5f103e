"""Tables over the grid: per dataset, rows method × budget, columns the retrieval metrics as mean ± std over seeds.

A cell's value is the mean over its evaluation students; the ± is the sample std of those cell values over seeds.
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
    """Group cell metrics (as written by ``Bench.evaluate``) by (method, budget)."""
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
    for m in metrics:
        groups.setdefault((m["method"], m.get("budget"), m.get("protocol", "strict")), []).append(m)
    rows = []
    for (method, budget, protocol), cells in groups.items():
        values = {}
        for key, _ in COLUMNS:
            per_seed = [c[key]["mean"] for c in cells]
            values[key] = (statistics.fmean(per_seed), statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0)
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
