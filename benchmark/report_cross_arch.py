"""The cross-architecture table (docs/protocols.md#cross-architecture-evaluation): per dataset and budget, rows
methods, columns architectures — the distillation tower (the main evaluation's strict ``r_mean``, marked *) then
every cross-architecture tower — each cell the mean ± the 95 % t half-width over seeds of the per-seed mean over
that tower's students (strict protocol)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from benchmark.report import HEADLINE, MD, TEX, Style, Table, fmt_interval, to_csv, to_latex, to_markdown
from benchmark.stats import Interval, t_interval

PROTOCOL = "strict"


@dataclass
class CrossArchTable:
    """``values[(method, budget)][tower]`` = the interval over seeds; ``towers`` in column order (source first)."""

    dataset: str
    source: str
    towers: list[str]
    methods: list[str]
    budgets: list[int]
    values: dict[tuple[str, int], dict[str, Interval]]
    per_seed: dict[tuple[str, int], dict[str, dict[int, float]]]


def collect(dataset: str, source: str, main_metrics: Iterable[dict[str, Any]],
            cross: Iterable[dict[str, Any]], methods: Sequence[str],
            order: Sequence[str] = ()) -> CrossArchTable | None:
    """The table from the cells' ``metrics.json`` and ``cross_arch.json`` records (columns: ``order``, then any
    other tower found); None when there are none."""
    per_seed: dict[tuple[str, int], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    towers: list[str] = []
    for rec in cross:
        for tower, res in rec["towers"].items():
            if tower not in towers:
                towers.append(tower)
            per_seed[(rec["method"], rec["budget"])][tower][rec["seed"]] = res["protocols"][PROTOCOL][HEADLINE]["mean"]
    if not per_seed:
        return None
    for rec in main_metrics:
        key = (rec["method"], rec["budget"])
        if key in per_seed and PROTOCOL in rec.get("protocols", {}):
            per_seed[key][source][rec["seed"]] = rec["protocols"][PROTOCOL][HEADLINE]["mean"]
    towers = [t for t in order if t in towers] + [t for t in towers if t not in order]
    values = {k: {t: t_interval([v[s] for s in sorted(v)]) for t, v in cols.items()} for k, cols in per_seed.items()}
    return CrossArchTable(dataset, source, [source, *towers], [m for m in methods if any(k[0] == m for k in values)],
                          sorted({b for _, b in values}), values, {k: dict(v) for k, v in per_seed.items()})


def _label(t: CrossArchTable, tower: str) -> str:
    return f"{tower}*" if tower == t.source else tower


def table(t: CrossArchTable, style: Style) -> Table:
    body = []
    for b in t.budgets:
        for m in t.methods:
            cols = t.values.get((m, b))
            if cols is None:
                continue
            body.append([style.esc(m), str(b), *[fmt_interval(cols[x], style) if x in cols else "-" for x in t.towers]])
    caption = (f"Cross-architecture evaluation on {t.dataset}: mean recall (%) of students with other image towers "
               "trained on each set (strict protocol), mean ± half-width of the 95% t interval over distillation "
               f"seeds of the mean over each tower's students; * = the tower the sets were distilled with (the main "
               "evaluation)")
    notes = ["heads: the frozen distillation tower with trainable image and text projection heads (the student "
             "RepBlend distils for)."] if "heads" in t.towers else []
    return Table(["method", "pairs", *[_label(t, x) for x in t.towers]], "lr" + "c" * len(t.towers), body,
                 caption, f"tab:{t.dataset}-cross-arch", notes)


def records(t: CrossArchTable) -> list[dict[str, Any]]:
    out = []
    for (m, b), cols in sorted(t.values.items(), key=lambda kv: (kv[0][1], t.methods.index(kv[0][0]))):
        for tower in t.towers:
            if tower in cols:
                iv = cols[tower]
                out.append({"method": m, "pairs": b, "tower": tower, "source": tower == t.source,
                            "n_seeds": iv.n, "r_mean": f"{iv.mean:.4f}", "lo": _num(iv.lo), "hi": _num(iv.hi)})
    return out


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.4f}"


def write_tables(t: CrossArchTable, out_dir: Path) -> list[Path]:
    """``<ds>_cross_arch.{md,csv,tex}`` under ``out_dir``."""
    from benchmark.io import atomic_path

    paths = []
    for suffix, text in ((".md", to_markdown(table(t, MD)) + "\n"), (".csv", to_csv(records(t))),
                         (".tex", to_latex(table(t, TEX)) + "\n")):
        path = out_dir / f"{t.dataset}_cross_arch{suffix}"
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        paths.append(path)
    return paths


def figure(t: CrossArchTable, styles: dict, path: Path, title: str) -> Path:
    """Mean recall per architecture (x) for each method (one marker/line style each), 95 % t intervals; one panel
    per budget."""
    from benchmark.artifacts import _yerr, pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(t.budgets), figsize=(1.6 + 1.3 * len(t.towers) * len(t.budgets), 3.8),
                             squeeze=False)
    xs = list(range(len(t.towers)))
    for ax, b in zip(axes[0], t.budgets):
        for k, m in enumerate(t.methods):
            cols = t.values.get((m, b))
            if not cols:
                continue
            st = styles.get(m)
            dx = (k - (len(t.methods) - 1) / 2) * 0.06
            pts = [(x + dx, cols[tw]) for x, tw in zip(xs, t.towers) if tw in cols]
            for x, iv in pts:
                err = _yerr(iv)
                ax.errorbar([x], [iv.mean], yerr=err, fmt=st.marker if st else "o", color=st.color if st else None,
                            ms=4, capsize=2, lw=0.8)
            ax.plot([x for x, _ in pts], [iv.mean for _, iv in pts], ls=st.linestyle if st else "-",
                    color=st.color if st else None, lw=0.8, label=m)
        ax.set_xticks(xs, [_label(t, x) for x in t.towers], rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{b} pairs", fontsize=9)
        ax.set_ylabel("mean recall (%)")
    axes[0][-1].legend(fontsize=6, loc="best")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
