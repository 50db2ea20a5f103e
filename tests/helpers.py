"""Small shared builders for tests: a test-sized student config and random training pairs."""

from __future__ import annotations

import torch

from benchmark.interface import TrainData
from benchmark.models.student import StudentConfig

TINY_TOWER = {"kind": "convnet", "width": 4, "depth": 1, "norm": "instance", "image_size": 8}


def tiny_student(text_dim: int = 6) -> StudentConfig:
    return StudentConfig(tower="tiny-test", text_dim=text_dim, tower_config=dict(TINY_TOWER))


def random_train(n_images: int = 12, caps_per_image: int = 2, text_dim: int = 6, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 8, 8, generator=g)
    caption_image = torch.arange(n_images).repeat_interleave(caps_per_image)
    texts = torch.randn(len(caption_image), text_dim, generator=g)
    return TrainData(images, texts, caption_image, [f"c{i}" for i in range(len(caption_image))])


def copy_repo(dst):
    """Copy the repository's files (tracked and untracked-not-ignored; no data/ or results/) into ``dst``."""
    from benchmark.perf.repo import copy_repo as copy

    return copy(dst)


def tiny_params(root, overrides=(), preset: str = "tiny"):
    """Write ``<root>/params.yaml`` resolved from ``preset`` (no dvc.yaml); returns its path."""
    from pathlib import Path

    from benchmark.params import write_params

    Path(root).mkdir(parents=True, exist_ok=True)
    return write_params(preset, Path(root) / "params.yaml", list(overrides), dvc_yaml=None)


def stage_args(root, params=None, results=None):
    """CLI arguments pointing a stage command at ``root``'s params, data and results."""
    from pathlib import Path

    root = Path(root)
    return ["--params", str(params or root / "params.yaml"), "--data-root", str(root / "data"), "--results-root",
            str(results or root / "results"), "--no-progress"]


def tiny_context(root, overrides=(), results=None, preset: str = "tiny"):
    """A StageContext of ``preset`` (with preset ``overrides``) over ``root``'s data."""
    from pathlib import Path

    from benchmark.params import resolve
    from benchmark.paths import Layout
    from benchmark.stages.context import StageContext

    root = Path(root)
    return StageContext(resolve(preset, list(overrides)), Layout(root / "data", Path(results or root / "results")),
                        progress=False)


def private_registry():
    """A copy of the method registry (entry points loaded) that a test may register into and drop."""
    from benchmark import registry

    registry.available_methods()
    private = registry._Registry()
    private.methods, private.loaded = dict(registry._REGISTRY.methods), True
    return private
