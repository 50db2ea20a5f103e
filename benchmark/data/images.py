"""Image access: a lazily-decoding dataset and an eager loader for small datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from benchmark.progress import Progress


class ImageFolder(torch.utils.data.Dataset):
    """Images at ``root / paths[i]``, opened with PIL as RGB and passed through ``transform``."""

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], transform: Callable) -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {path} not found; run `mmdd fetch` for this dataset (with the same data root)"
            ) from None
        return self.transform(rgb)


def load_images(root: str | os.PathLike, paths: Sequence[str], transform: Callable,
                progress: bool = True) -> torch.Tensor:
    """Decode and transform every image into one float32 tensor ``[n, 3, H, W]`` (for small datasets)."""
    folder = ImageFolder(root, paths, transform)
    if len(folder) == 0:
        raise ValueError(f"no images to load under {root}")
    first = folder[0]
    out = torch.empty((len(folder), *first.shape), dtype=torch.float32)
    out[0] = first
    with Progress(len(folder), f"images {Path(root).name}", "image", initial=1,
                  enabled=None if progress else False) as bar:
        for i in range(1, len(folder)):
            out[i] = folder[i]
            bar.update()
    return out


def gather_images(source: torch.Tensor | ImageFolder, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Images ``indices`` of a preloaded tensor or an :class:`ImageFolder`, stacked as ``[k, 3, H, W]``."""
    if isinstance(source, torch.Tensor):
        return source[torch.as_tensor(indices, dtype=torch.long)]
    idx = torch.as_tensor(indices, dtype=torch.long).tolist()
    return torch.stack([source[i] for i in idx])
