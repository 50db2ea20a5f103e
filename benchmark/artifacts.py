"""Human-readable artifacts: a distilled set's image grid, nearest training caption per text feature and loss curve;
the report's figures (recall vs budget, per-seed strip plots, distillation curves) in a colour-blind-safe style."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmark.io import atomic_path
from benchmark.stats import Interval


def denormalize(images: torch.Tensor, norm: str) -> torch.Tensor:
    """Map normalised images back to [0, 1] with the named statistics (see ``benchmark.data.transforms``)."""
    from benchmark.data.transforms import NORMALIZATION

    mean, std = (torch.tensor(v, dtype=images.dtype).view(1, 3, 1, 1) for v in NORMALIZATION[norm])
    return (images * std + mean).clamp(0, 1)


def save_image_grid(images: torch.Tensor, norm: str, path: Path, max_images: int = 64, scale: int = 2,
                    min_tile: int = 64) -> Path:
    """A PNG grid of the first ``max_images`` images, upscaled ``scale``× with nearest neighbour, or more where a
    tile would otherwise be under ``min_tile`` pixels (legible at the size a README shows it)."""
    from PIL import Image

    x = denormalize(images[:max_images].detach().float().cpu(), norm)
    n, _, h, w = x.shape
    scale = max(scale, math.ceil(min_tile / min(h, w)))
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = torch.ones(3, rows * (h + 1) + 1, cols * (w + 1) + 1)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = x[k]
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def nearest_captions(texts: torch.Tensor, train_texts: torch.Tensor, captions: list[str]) -> list[tuple[int, float, str]]:
    """For each distilled text feature: (index of the most cosine-similar training caption, cosine, caption)."""
    a = torch.nn.functional.normalize(texts.float(), dim=1)
    b = torch.nn.functional.normalize(train_texts.float(), dim=1)
    cos, idx = (a @ b.T).max(1)
    return [(int(i), float(c), captions[int(i)]) for i, c in zip(idx, cos)]


def save_nearest_captions(texts: torch.Tensor, train_texts: torch.Tensor, captions: list[str], path: Path) -> Path:
    rows = nearest_captions(texts, train_texts, captions)
    body = "pair\ttrain_caption\tcosine\tcaption\n" + "".join(
        f"{k}\t{i}\t{c:.4f}\t{cap}\n" for k, (i, c, cap) in enumerate(rows))
    with atomic_path(path) as tmp:
        tmp.write_text(body)
    return path


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    """Save a figure as PNG atomically and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
    return path


def line_plot(series: dict[str, tuple[list[float], list[float]]], path: Path, xlabel: str, ylabel: str,
              title: str = "") -> Path:
    """One line per labelled (xs, ys) series."""
    fig, ax = pyplot().subplots(figsize=(5.5, 3.6))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, lw=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def save_loss_curve(history: list[dict[str, float]], path: Path, title: str = "") -> Path | None:
    """Plot every logged key containing 'loss' against the iteration; None if there is nothing to plot."""
    keys = sorted({k for rec in history for k in rec if "loss" in k})
    if not keys:
        return None
    series = {k: ([r["step"] for r in history if k in r], [r[k] for r in history if k in r]) for k in keys}
    return line_plot(series, path, "iteration", "matching loss", title)


# ---------------------------------------------------------------------------------------------- report figures

# Okabe & Ito's colour-blind-safe palette without its yellow (too faint on white), plus Tol's wine; markers and
# line styles differ as well, so no two methods are told apart by colour alone.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#882255")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h")
LINESTYLES = ("-", "--", "-.", ":")
CHANCE_STYLE = {"color": "0.35", "ls": ":", "lw": 1.0}


@dataclass(frozen=True)
class MethodStyle:
    color: str
    marker: str
    linestyle: str


def method_styles(methods: Sequence[str]) -> dict[str, MethodStyle]:
    """A fixed style per method, by its position in ``methods`` (the same across every figure of a report)."""
    return {m: MethodStyle(PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)], LINESTYLES[i % len(LINESTYLES)])
            for i, m in enumerate(methods)}


@dataclass(frozen=True)
class StripItem:
    """One method in a strip panel: its per-seed values, their interval, and its tie-group rank (None: unranked)."""

    method: str
    values: dict[int, float]
    interval: Interval
    rank: int | None = None
    group: int | None = None


def _yerr(iv: Interval) -> list[list[float]] | None:
    if math.isnan(iv.lo):
        return None
    return [[iv.mean - iv.lo], [iv.hi - iv.mean]]


def _chance_line(ax, chance: float | None, label: bool = True) -> None:
    if chance is not None:
        ax.axhline(chance, **CHANCE_STYLE, label=f"chance ({chance:.2f})" if label else None, zorder=1)


def recall_vs_budget_figure(series: dict[str, list[tuple[int, Interval]]], references: dict[str, Interval],
                            chance: float | None, styles: dict[str, MethodStyle], path: Path, title: str = "",
                            ylabel: str = "mean recall (%)") -> Path:
    """Recall against the budget (log x), one marker and line style per method, 95 % interval bars, methods
    dodged sideways; the references (single runs, ± std over students) in their own panel so they do not
    squeeze the axis; chance as a dotted line; y from 0."""
    plt = pyplot()
    if references:
        fig, (ax, axr) = plt.subplots(1, 2, figsize=(8.0, 3.9), gridspec_kw={"width_ratios": [3.2, 1]})
    else:
        fig, ax = plt.subplots(figsize=(6.0, 3.9))
    budgets = sorted({b for pts in series.values() for b, _ in pts})
    step = _dodge_step(budgets, len(series))
    for i, (method, pts) in enumerate(series.items()):
        st = styles[method]
        dodge = math.exp(step * (i - (len(series) - 1) / 2))
        for j, (b, iv) in enumerate(pts):
            ax.errorbar([b * dodge], [iv.mean], yerr=_yerr(iv), color=st.color, marker=st.marker, ms=5, capsize=2.5,
                        elinewidth=1, lw=0, label=method if j == 0 else None, zorder=3)
        ax.plot([b * dodge for b, _ in pts], [iv.mean for _, iv in pts], color=st.color, ls=st.linestyle, lw=1.2)
    _chance_line(ax, chance)
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_xlabel("budget (synthetic pairs)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, ncol=min(5, len(series) + 1), frameon=False, loc="upper center",
              bbox_to_anchor=(0.5, -0.2))
    if references:
        _reference_panel(axr, references, chance)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _dodge_step(budgets: Sequence[int], k: int) -> float:
    """Sideways offset between methods in log-x units: together they span a fifth of the closest budget gap."""
    gaps = [math.log(b / a) for a, b in zip(budgets, budgets[1:])]
    return 0.2 * (min(gaps) if gaps else 0.5) / max(k, 1)


def _reference_panel(ax, references: dict[str, Interval], chance: float | None) -> None:
    names = list(references)
    for i, name in enumerate(names):
        iv = references[name]
        ax.bar([i], [iv.mean], color="0.8", edgecolor="0.3", width=0.6)
        ax.errorbar([i], [iv.mean], yerr=_yerr(iv), color="black", capsize=3, lw=0, elinewidth=1)
        ax.annotate(f"{iv.mean:.1f}", (i, iv.mean), textcoords="offset points", xytext=(0, 4), ha="center",
                    fontsize=7)
    _chance_line(ax, chance, label=False)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(bottom=0, top=max(iv.mean + (0 if math.isnan(iv.hi) else iv.hi - iv.mean)
                                  for iv in references.values()) * 1.15)
    ax.set_title("references\n(single runs, ± std over students)", fontsize=7)


def seed_strip_figure(panels: Sequence[tuple[str, Sequence[StripItem]]], chance: float | None,
                      styles: dict[str, MethodStyle], path: Path, title: str = "",
                      ylabel: str = "mean recall (%)") -> Path:
    """One panel per budget: each seed's value as a dot, the mean and its 95 % interval as a bar beside them,
    methods in ranking order with alternate tie groups shaded and their rank on top; chance dotted; y from 0."""
    plt = pyplot()
    width = max(4.0, 1.2 + 0.55 * sum(len(items) for _, items in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, 4.0), sharey=True, squeeze=False)
    for ax, (panel_title, items) in zip(axes[0], panels):
        _strip_panel(ax, items, styles)
        _chance_line(ax, chance, label=ax is axes[0][0])
        ax.set_title(panel_title, fontsize=8, pad=14)
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].set_ylim(bottom=0)
    if chance is not None:
        axes[0][0].legend(fontsize=7, frameon=False, loc="lower left")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _strip_panel(ax, items: Sequence[StripItem], styles: dict[str, MethodStyle]) -> None:
    for x, it in enumerate(items):
        if it.group is not None and it.group % 2 == 0:
            ax.axvspan(x - 0.5, x + 0.5, color="0.92", zorder=0, lw=0)
        st = styles[it.method]
        seeds = sorted(it.values)
        offsets = [0.0] if len(seeds) == 1 else [-0.18 + 0.26 * i / (len(seeds) - 1) for i in range(len(seeds))]
        ax.scatter([x + o for o in offsets], [it.values[s] for s in seeds], color=st.color, marker=st.marker, s=24,
                   edgecolor="black", linewidth=0.4, zorder=3)
        ax.errorbar([x + 0.22], [it.interval.mean], yerr=_yerr(it.interval), fmt="_", color="black", ms=10,
                    capsize=3, elinewidth=1.2, zorder=4)
        if it.rank is not None:
            ax.text(x, 1.0, f"#{it.rank}", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(-0.6, len(items) - 0.4)
    ax.set_xticks(range(len(items)), [it.method for it in items], rotation=35, ha="right", fontsize=7)


def distill_curves_figure(panels: Sequence[tuple[str, dict[str, Any]]], styles: dict[str, MethodStyle], path: Path,
                          title: str = "") -> Path:
    """One panel per budget: per method the smoothed normalised matching loss, mean over seeds with the range over
    seeds as a band (``benchmark.report.Curve``), phase boundaries as vertical lines, 1 (no progress) dashed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(5.0, 3.6 * len(panels)), 3.6), sharey=True,
                             squeeze=False)
    for ax, (panel_title, curves) in zip(axes[0], panels):
        for method, c in curves.items():
            st = styles[method]
            ax.fill_between(c.iterations, c.lo, c.hi, color=st.color, alpha=0.18, lw=0)
            ax.plot(c.iterations, c.mean, color=st.color, ls=st.linestyle, lw=1.3, label=f"{method} ({c.seeds} seeds)")
            for k, it in enumerate(c.phase_starts, start=2):
                ax.axvline(it - 0.5, color=st.color, ls=":", lw=1)
                ax.text(it, 0.02, f" {method} phase {k}", transform=ax.get_xaxis_transform(), fontsize=6,
                        va="bottom", color=st.color, rotation=90)
        ax.axhline(1.0, color="0.35", ls="--", lw=0.8, label="1 = no progress")
        ax.set_title(panel_title, fontsize=8)
        ax.set_xlabel("outer iteration")
    axes[0][0].set_ylabel("normalised matching loss\n(smoothed; band: range over seeds)")
    axes[0][0].legend(fontsize=7, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                      ncol=min(3, 1 + max(len(c) for _, c in panels)))
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
