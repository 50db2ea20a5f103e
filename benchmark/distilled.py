"""DistilledSet: what every method returns and the only thing evaluation sees (docs/protocols.md#the-distilledset).

Saved as ``<stem>.safetensors`` (tensors) + ``<stem>.json`` (phases' scalars, method, params, budget, dataset,
encoder, seed, versions). The JSON is written last, so its presence marks a complete set. No pickle.

A set may ask three things of the harness's evaluation, each bounded by :class:`EvalBounds` in :meth:`validate`:
per-phase learning rates (``lr_img``, ``lr_txt``), per-phase epochs (else ``eval.epochs``), and the training loss
(``loss``, one of :data:`benchmark.losses.LOSSES`), plus the phases' target similarities. Everything else
(students, batch size, momentum, weight decay, the lr drop, batching, eval_every, protocols, model selection,
seeds) comes from the harness's configuration only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmark.io import atomic_path, write_tensors
from benchmark.constants import SIMILARITY_KINDS



@dataclass(frozen=True)
class EvalBounds:
    """What a set may ask of evaluation: the rules ``phases``, ``epochs`` and ``lr`` of :meth:`DistilledSet.validate`.

    Generous for every published method (one to a few phases, tens to hundreds of epochs, rates below 1), tight
    enough that a set cannot turn evaluation into an endless job."""

    max_phases: int = 16
    max_epochs: int = 1000  # per phase
    max_total_epochs: int = 2000  # over the phases that set their own
    max_lr: float = 10.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class InvalidDistilledSet(ValueError):
    """A DistilledSet breaks a rule of the contract (budget, shapes, dtypes, finiteness)."""


@dataclass
class Phase:
    """One phase of a distilled set: ``n`` synthetic pairs with optional target similarity and learned rates.

    ``similarity`` kinds: ``none`` (identity target), ``full`` (``sim_full [n, n]``) or ``lowrank``
    (``S = diag(a) + (alpha / r) · L Rᵀ`` with ``a [n]``, ``L, R [n, r]``).
    """

    images: torch.Tensor
    texts: torch.Tensor
    lr_img: float
    lr_txt: float
    similarity: str = "none"
    sim_full: torch.Tensor | None = None
    sim_a: torch.Tensor | None = None
    sim_l: torch.Tensor | None = None
    sim_r: torch.Tensor | None = None
    sim_alpha: float = 1.0
    epochs: int | None = None

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def target_similarity(self) -> torch.Tensor | None:
        """The full ``[n, n]`` target S, or None for the identity."""
        if self.similarity == "full":
            return self.sim_full
        if self.similarity == "lowrank":
            r = self.sim_l.shape[1]
            return torch.diag(self.sim_a) + (self.sim_alpha / r) * self.sim_l @ self.sim_r.T
        return None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"images": self.images, "texts": self.texts}
        for name in ("sim_full", "sim_a", "sim_l", "sim_r"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        return out

    def scalars(self) -> dict[str, Any]:
        return {"n": self.n, "lr_img": float(self.lr_img), "lr_txt": float(self.lr_txt), "similarity": self.similarity,
                "sim_alpha": float(self.sim_alpha), "epochs": self.epochs}


@dataclass
class DistilledSet:
    """An ordered list of phases, the loss evaluation students train with (one of
    :data:`benchmark.losses.LOSSES`), plus provenance metadata."""

    phases: list[Phase]
    meta: dict[str, Any] = field(default_factory=dict)
    loss: str = "ce"

    @property
    def pairs(self) -> int:
        return sum(p.n for p in self.phases)

    @property
    def nbytes(self) -> int:
        """Storage of every distilled tensor (learned rates count as two float32 each)."""
        total = 0
        for p in self.phases:
            total += sum(t.numel() * t.element_size() for t in p.tensors().values()) + 8
        return total

    def validate(self, budget: int | None = None, image_shape: tuple[int, ...] | None = None,
                 text_dim: int | None = None, bounds: EvalBounds = EvalBounds()) -> None:
        """Raise :class:`InvalidDistilledSet` naming the broken rule."""
        if not self.phases:
            raise InvalidDistilledSet("rule 'non-empty': the set has no phases")
        if len(self.phases) > bounds.max_phases:
            raise InvalidDistilledSet(f"rule 'phases': {len(self.phases)} phases, at most {bounds.max_phases} "
                                      "(EvalBounds.max_phases)")
        self._validate_loss()
        self._validate_epochs(bounds)
        if budget is not None and self.pairs > budget:
            raise InvalidDistilledSet(f"rule 'budget': {self.pairs} pairs exceed the budget of {budget}")
        for k, p in enumerate(self.phases):
            where = f"phase {k}"
            if p.images.dim() != 4 or p.images.shape[1] != 3:
                raise InvalidDistilledSet(f"rule 'shapes': {where} images must be [n, 3, H, W], got "
                                          f"{list(p.images.shape)}")
            if image_shape is not None and tuple(p.images.shape[1:]) != tuple(image_shape):
                raise InvalidDistilledSet(f"rule 'shapes': {where} images are {list(p.images.shape[1:])}, the "
                                          f"student expects {list(image_shape)}")
            if p.texts.dim() != 2 or p.texts.shape[0] != p.n:
                raise InvalidDistilledSet(f"rule 'shapes': {where} texts must be [n={p.n}, D], got "
                                          f"{list(p.texts.shape)}")
            if text_dim is not None and p.texts.shape[1] != text_dim:
                raise InvalidDistilledSet(f"rule 'shapes': {where} texts have dim {p.texts.shape[1]}, the "
                                          f"caption features have {text_dim}")
            if p.n == 0:
                raise InvalidDistilledSet(f"rule 'shapes': {where} is empty")
            for name, t in p.tensors().items():
                if t.dtype != torch.float32:
                    raise InvalidDistilledSet(f"rule 'dtypes': {where} {name} is {t.dtype}, must be float32")
                if not torch.isfinite(t).all():
                    raise InvalidDistilledSet(f"rule 'finite': {where} {name} has NaN or inf values")
            for name in ("lr_img", "lr_txt"):
                v = getattr(p, name)
                if not _is_number(v) or not (math.isfinite(v) and v >= 0):
                    raise InvalidDistilledSet(f"rule 'finite': {where} {name}={v!r} must be finite and >= 0")
                if v > bounds.max_lr:
                    raise InvalidDistilledSet(f"rule 'lr': {where} {name}={v} exceeds {bounds.max_lr} "
                                              "(EvalBounds.max_lr)")
            if not _is_number(p.sim_alpha) or not math.isfinite(p.sim_alpha):
                raise InvalidDistilledSet(f"rule 'finite': {where} sim_alpha={p.sim_alpha!r} must be finite")
            if not isinstance(p.similarity, str) or p.similarity not in SIMILARITY_KINDS:
                raise InvalidDistilledSet(f"rule 'similarity': {where} kind {p.similarity!r} not in "
                                          f"{SIMILARITY_KINDS}")
            if p.similarity == "full" and (p.sim_full is None or tuple(p.sim_full.shape) != (p.n, p.n)):
                raise InvalidDistilledSet(f"rule 'shapes': {where} full similarity must be [{p.n}, {p.n}]")
            if p.similarity == "lowrank":
                ok = (p.sim_a is not None and p.sim_l is not None and p.sim_r is not None
                      and tuple(p.sim_a.shape) == (p.n,) and p.sim_l.shape[0] == p.n
                      and p.sim_l.shape == p.sim_r.shape and p.sim_l.dim() == 2 and 0 < p.sim_l.shape[1] <= p.n)
                if not ok:
                    raise InvalidDistilledSet(f"rule 'shapes': {where} low-rank similarity needs a [n], L and R "
                                              f"[n, r] with n={p.n} and 0 < r <= n")

    def _validate_loss(self) -> None:
        from benchmark.losses import LOSSES

        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise InvalidDistilledSet(f"rule 'loss': loss={self.loss!r} is not one of {sorted(LOSSES)}")

    def _validate_epochs(self, bounds: EvalBounds) -> None:
        total = 0
        for k, p in enumerate(self.phases):
            if p.epochs is None:
                continue
            if not isinstance(p.epochs, int) or isinstance(p.epochs, bool):
                raise InvalidDistilledSet(f"rule 'epochs': phase {k} epochs={p.epochs!r} must be an integer")
            if not 0 < p.epochs <= bounds.max_epochs:
                raise InvalidDistilledSet(f"rule 'epochs': phase {k} epochs={p.epochs} must be in "
                                          f"[1, {bounds.max_epochs}] (EvalBounds.max_epochs)")
            total += p.epochs
        if total > bounds.max_total_epochs:
            raise InvalidDistilledSet(f"rule 'epochs': the phases ask for {total} epochs in all, at most "
                                      f"{bounds.max_total_epochs} (EvalBounds.max_total_epochs)")

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write ``stem.safetensors`` then ``stem.json`` atomically; return both paths."""
        stem = Path(stem)
        tensors = {f"phase{k}.{name}": t.detach().float().cpu().contiguous()
                   for k, p in enumerate(self.phases) for name, t in p.tensors().items()}
        st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        write_tensors(st_path, tensors)
        doc = {"format": "mmdd-distilled-set", "version": 1, "pairs": self.pairs, "bytes": self.nbytes,
               "loss": self.loss, "phases": [p.scalars() for p in self.phases], "meta": self.meta}
        with atomic_path(js_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")
        return st_path, js_path

    @classmethod
    def load(cls, stem: str | Path) -> "DistilledSet":
        """Read a set written by :meth:`save` (or by a method running in a container)."""
        stem = Path(stem)
        st_path, js_path = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if not js_path.exists() or not st_path.exists():
            raise FileNotFoundError(f"distilled set {stem} is incomplete: need both {st_path.name} and "
                                    f"{js_path.name}; rerun `mmdd distill`")
        try:
            doc = json.loads(js_path.read_text())
            tensors = load_file(str(st_path))
        except Exception as exc:
            raise InvalidDistilledSet(f"rule 'format': cannot read {stem}: {exc}") from exc
        if doc.get("format") != "mmdd-distilled-set":
            raise InvalidDistilledSet(f"rule 'format': {js_path} is not an mmdd distilled set")
        phases = []
        for k, sc in enumerate(doc["phases"]):
            get = lambda name: tensors.get(f"phase{k}.{name}")  # noqa: E731
            if get("images") is None or get("texts") is None:
                raise InvalidDistilledSet(f"rule 'format': phase {k} lacks images or texts in {st_path.name}")
            phases.append(Phase(images=get("images"), texts=get("texts"), lr_img=sc["lr_img"], lr_txt=sc["lr_txt"],
                                similarity=sc.get("similarity", "none"), sim_full=get("sim_full"),
                                sim_a=get("sim_a"), sim_l=get("sim_l"), sim_r=get("sim_r"),
                                sim_alpha=sc.get("sim_alpha", 1.0), epochs=sc.get("epochs")))
        return cls(phases, doc.get("meta", {}), doc.get("loss", "ce"))
