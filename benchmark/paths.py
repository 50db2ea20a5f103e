"""Deterministic locations of every stage's outputs (each grid cell is a pure function of its config).

Stage outputs never nest inside each other (DVC requires disjoint outputs)::

    data/raw/<ds>/                         fetch: annotations/ + images
    data/features/<ds>/<encoder>/<split>.safetensors
    data/experts/<ds>/<tower>-<encoder>/expert_000.safetensors ...
    data/prepared/<ds>/<method>/<requirement id>/   prepare: what a method's requirements ask for
    results/cells/<preset>/<ds>/<method>/b<budget>/s<seed>/
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def _safe(name: str) -> str:
    return name.replace("/", "_")


@dataclass(frozen=True)
class Layout:
    data_root: Path
    results_root: Path

    @property
    def raw_root(self) -> Path:
        """The ``data_root`` argument of the dataset loaders."""
        return self.data_root / "raw"

    def dataset_dir(self, ds: str) -> Path:
        return self.raw_root / ds

    def features_dir(self, ds: str, encoder: str) -> Path:
        return self.data_root / "features" / ds / _safe(encoder)

    def features(self, ds: str, encoder: str, split: str) -> Path:
        return self.features_dir(ds, encoder) / f"{split}.safetensors"

    def experts(self, ds: str, tower: str, encoder: str) -> Path:
        return self.data_root / "experts" / ds / f"{tower}-{_safe(encoder)}"

    def prepared(self, ds: str, method: str) -> Path:
        """Root of the artifacts prepared for one method (one sub-directory per requirement)."""
        return self.data_root / "prepared" / ds / method

    def cell(self, preset: str, ds: str, method: str, budget: int, seed: int) -> Path:
        return self.results_root / "cells" / preset / ds / method / f"b{budget}" / f"s{seed}"

    def full_data(self, preset: str, ds: str) -> Path:
        return self.results_root / "cells" / preset / ds / "full-data"

    def tables(self, preset: str) -> Path:
        return self.results_root / "tables" / preset
