"""Human-readable artifacts of a distilled set: image grid, nearest training caption per text feature, loss curve."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from benchmark.io import atomic_path


def denormalize(images: torch.Tensor, norm: str) -> torch.Tensor:
    """Map normalised images back to [0, 1] with the named statistics (see ``benchmark.data.transforms``)."""
    from benchmark.data.transforms import NORMALIZATION

    mean, std = (torch.tensor(v, dtype=images.dtype).view(1, 3, 1, 1) for v in NORMALIZATION[norm])
    return (images * std + mean).clamp(0, 1)


def save_image_grid(images: torch.Tensor, norm: str, path: Path, max_images: int = 64, scale: int = 2) -> Path:
    """A PNG grid of the first ``max_images`` images (upscaled ``scale``× with nearest neighbour)."""
    from PIL import Image

    x = denormalize(images[:max_images].detach().float().cpu(), norm)
    n, _, h, w = x.shape
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
