"""Cross-architecture evaluation (docs/protocols.md#cross-architecture-evaluation): a distilled set is also trained
on students whose image tower differs from the one it was distilled with.

* A tower name is a config under ``benchmark/models/configs`` (random init unless the config says ``pretrained``):
  the student is that tower + a fresh text head, trained and tested exactly as the main evaluation trains its
  students (:func:`benchmark.evaluation.evaluate_set`: the set's phases, its learned learning rates, its targets),
  with ``cross_arch.students`` students and the ``strict`` protocol (``select: final``).
* :data:`HEADS` is the frozen-encoder family that RepBlend distils for (docs/methods.md#repblend): the distillation
  tower, frozen — harness expert 0's image tower at its last epoch, or the config's published weights when it has
  them — followed by an image projection head; only the two heads are trained. It is evaluated whenever a grid
  method distils for that student (``student: heads`` in its parameters), listed or not.
* One resize rule: synthetic images of another resolution than the tower's ``image_size`` are resized bilinearly with
  antialiasing in their normalised space (:func:`resize_images`); test images are decoded from their files at the
  tower's size by the usual test transform.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from benchmark.distilled import DistilledSet
from benchmark.evaluation import EvalConfig
from benchmark.models.student import StudentConfig
from benchmark.models.towers import available_towers, load_tower_config
from benchmark.training import image_chunks

HEADS = "heads"
ENCODE_CHUNK = 256  # images per frozen-encoder call (no coupling across samples, so chunking is exact)


@dataclass
class CrossArchConfig:
    """``towers``: the architectures (tower config names, or ``heads``); ``students``: evaluation students per tower
    and cell; ``methods``: the grid methods evaluated (empty: every grid method)."""

    towers: list[str] = field(default_factory=list)
    students: int = 1
    methods: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        known = [*available_towers(), HEADS]
        for name in ("towers", "methods"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"cross_arch.{name} must be a list of names, got {value!r}")
            if len(set(value)) != len(value):
                raise ValueError(f"cross_arch.{name} lists a name twice: {value}: remove the duplicate")
        unknown = [t for t in self.towers if t not in known]
        if unknown:
            raise ValueError(f"cross_arch.towers: unknown tower {unknown[0]!r}: choose from {known} (a tower is a "
                             "JSON config in benchmark/models/configs/; add one there)")
        if isinstance(self.students, bool) or not isinstance(self.students, int) or self.students <= 0:
            raise ValueError(f"cross_arch.students must be a positive integer, got {self.students!r}")


def check_cross_arch(cfg: CrossArchConfig, main_tower: str, grid_methods: Iterable[str]) -> None:
    """Cross-section checks: the methods are grid methods and no listed tower is the distillation tower."""
    grid = list(grid_methods)
    stray = [m for m in cfg.methods if m not in grid]
    if stray:
        raise ValueError(f"cross_arch.methods: {stray} not in grid.methods {grid}: remove them or add them to the grid")
    if main_tower in cfg.towers:
        raise ValueError(f"cross_arch.towers lists {main_tower!r}, the student tower the sets are distilled with "
                         "(the main evaluation already trains it): remove it")


def distils_for_heads(params: Iterable[dict[str, Any]]) -> bool:
    """Whether any of these resolved cell parameters distil for the frozen-encoder heads student."""
    return any(p.get("student") == HEADS for p in params)


def resolved_towers(cross: CrossArchConfig, method_params: Iterable[dict[str, Any]]) -> list[str]:
    """The towers evaluated: the configured ones, plus :data:`HEADS` when a method distils for it."""
    towers = list(cross.towers)
    if HEADS not in towers and distils_for_heads(method_params):
        towers.append(HEADS)
    return towers


def cross_eval_config(ecfg: EvalConfig, cross: CrossArchConfig) -> EvalConfig:
    """The main evaluation's settings with ``cross.students`` students, strict protocol, final epoch."""
    return replace(ecfg, students=cross.students, protocols=["strict"], select="final")


def tower_student(student: StudentConfig, tower: str) -> StudentConfig:
    """``student`` with another image tower (same text head, temperature, dropout)."""
    return replace(student, tower=tower, pretrained=None, tower_config=load_tower_config(tower))


def heads_student(student: StudentConfig, width: int) -> StudentConfig:
    """The heads family over ``width``-d encoder features: an image projection head width→width + the text head."""
    return replace(student, tower=HEADS, pretrained=None,
                   tower_config={"kind": "projection", "in_dim": int(width), "dropout": student.head_dropout,
                                 "image_size": 0})


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """THE resize rule: ``[n, 3, h, w]`` to ``[n, 3, size, size]``, bilinear with antialiasing (a no-op when the
    size already matches)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def map_images(dset: DistilledSet, fn) -> DistilledSet:
    """A copy of ``dset`` whose every phase's images are ``fn(images)`` (texts, rates and targets unchanged)."""
    return replace(dset, phases=[replace(p, images=fn(p.images)) for p in dset.phases], meta=dict(dset.meta))


@torch.no_grad()
def encode_images(encoder: nn.Module, images: Any, device: torch.device | str) -> torch.Tensor:
    """Features of every image (a tensor or an indexable dataset) under a frozen encoder, in chunks, on the CPU."""
    encoder.eval()
    return torch.cat([encoder(xb.to(device)).float().cpu() for xb in image_chunks(images, ENCODE_CHUNK)])
