"""The method interface (DESIGN §3): what a method receives (:class:`DistillTask`) and must return (a DistilledSet)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Sequence

import torch
from safetensors.torch import load_file

from benchmark.distilled import DistilledSet
from benchmark.experts.store import ExpertCollection
from benchmark.io import atomic_path, write_tensors
from benchmark.models.student import DualEncoder, StudentConfig, build_student

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    """The training split as pairs: caption ``j`` with image ``caption_image[j]``.

    ``images`` is a float32 tensor ``[n_images, 3, H, W]`` in normalised space (small datasets, preloaded) or an
    indexable dataset returning such tensors; use :meth:`image_batch` to gather either way.
    """

    images: Any
    texts: torch.Tensor
    caption_image: torch.Tensor
    captions: list[str] = field(default_factory=list)

    @property
    def n_pairs(self) -> int:
        return int(self.texts.shape[0])

    def image_batch(self, pair_idx: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Images of the given pairs, stacked ``[b, 3, H, W]``."""
        img_idx = self.caption_image[torch.as_tensor(pair_idx, dtype=torch.long)]
        if isinstance(self.images, torch.Tensor):
            return self.images[img_idx]
        return torch.stack([self.images[int(i)] for i in img_idx])

    def pairs(self, pair_idx: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, caption features) of the given pairs."""
        idx = torch.as_tensor(pair_idx, dtype=torch.long)
        return self.image_batch(idx), self.texts[idx]


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...


class JsonlLogger:
    """Appends ``{"step": s, **metrics}`` lines to a file (and keeps them in memory)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.records: list[dict[str, float]] = []
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: dict[str, float], step: int) -> None:
        rec = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.records.append(rec)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")


class Checkpointer:
    """Atomic checkpoints for resumable methods: tensors in safetensors, the rest (JSON-able) in a sidecar.

    ``save`` writes the tensors first and the JSON last; ``load`` returns None unless both exist and agree.
    """

    def __init__(self, directory: str | Path | None, every: int = 0):
        self.directory = Path(directory) if directory else None
        self.every = every

    @property
    def enabled(self) -> bool:
        return self.directory is not None and self.every > 0

    def due(self, iteration: int) -> bool:
        return self.enabled and iteration > 0 and iteration % self.every == 0

    def save(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        if self.directory is None:
            return
        token = f"{state.get('iteration', 0)}-{state.get('phase', 0)}"
        write_tensors(self.directory / "checkpoint.safetensors", tensors, metadata={"token": token})
        with atomic_path(self.directory / "checkpoint.json") as tmp:
            tmp.write_text(json.dumps(dict(state, token=token), sort_keys=True))

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if self.directory is None:
            return None
        st, js = self.directory / "checkpoint.safetensors", self.directory / "checkpoint.json"
        if not (st.exists() and js.exists()):
            return None
        from safetensors import safe_open

        state = json.loads(js.read_text())
        with safe_open(str(st), framework="pt") as f:
            if (f.metadata() or {}).get("token") != state.get("token"):
                log.warning("checkpoint tensors and state disagree (interrupted save); starting over")
                return None
        return load_file(str(st)), state

    def clear(self) -> None:
        if self.directory is None:
            return
        for name in ("checkpoint.safetensors", "checkpoint.json"):
            (self.directory / name).unlink(missing_ok=True)


@dataclass
class DistillTask:
    """Everything a method may use. Methods never see the val or test split."""

    train: TrainData
    student: StudentConfig
    budget: int
    seed: int
    params: dict[str, Any]
    device: str | torch.device = "cpu"
    experts: ExpertCollection | None = None
    shortcuts: Path | None = None  # root of shortcut teachers: <root>/shortcut_s<start>_e<end>/
    logger: MetricLogger = field(default_factory=JsonlLogger)
    checkpoint: Checkpointer = field(default_factory=lambda: Checkpointer(None))
    dataset: str = ""
    preset: str = "quick"

    def make_student(self, seed: int | None = None) -> DualEncoder:
        """A fresh student on the task's device."""
        return build_student(self.student, seed=seed, device=self.device)

    def require_experts(self, method: str) -> ExpertCollection:
        if self.experts is None:
            raise RuntimeError(f"method {method!r} needs expert trajectories: run `mmdd experts` first")
        return self.experts


class Method:
    """Base class of a distillation method. Subclasses set ``name`` and implement :meth:`distill`.

    ``defaults`` maps a preset name to default hyperparameters; :meth:`default_params` may refine them by dataset
    and budget. Unknown override keys are rejected so typos fail loudly.
    """

    name: ClassVar[str] = ""
    needs_experts: ClassVar[bool] = False
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def default_params(cls, preset: str, dataset: str, budget: int) -> dict[str, Any]:
        return dict(cls.defaults.get(preset, cls.defaults.get("quick", {})))

    @classmethod
    def resolve_params(cls, preset: str, dataset: str, budget: int,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        params = cls.default_params(preset, dataset, budget)
        for key, value in (overrides or {}).items():
            if key not in params:
                raise ValueError(f"method {cls.name!r} has no parameter {key!r}; known: {sorted(params)}")
            params[key] = value
        return params

    def distill(self, task: DistillTask) -> DistilledSet:  # pragma: no cover - interface
        raise NotImplementedError
