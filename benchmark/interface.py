"""The method interface (docs/architecture.md#the-method-contract): what a method declares (its defaults per
profile and its requirements), what it receives (:class:`DistillTask`) and what it must return (a DistilledSet)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence

import torch
from safetensors.torch import load_file

from benchmark.distilled import DistilledSet
from benchmark.io import atomic_path, write_tensors
from benchmark.models.student import DualEncoder, StudentConfig, build_student
from benchmark.requirements import EXPERTS, Requirement

if TYPE_CHECKING:
    from benchmark.experts.store import ExpertCollection

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


# Per-iteration measurements of the machine, not of the computation: kept out of the hashed log.
VOLATILE_KEYS = frozenset({"sec_per_iter", "teacher_io_s", "peak_mem_mb", "mem_base_mb"})


class JsonlLogger:
    """Appends ``{"step": s, **metrics}`` lines to ``path`` (and keeps them in memory).

    Keys in :data:`VOLATILE_KEYS` (timings, memory) go to ``volatile_path`` instead, so the log itself is a pure
    function of the computation. :meth:`truncate` drops records past a resumed checkpoint, so a resumed run's log
    holds every iteration exactly once.

    A file is never changed in place where it already existed: DVC links cached outputs into the workspace
    (``cache.type`` hardlink), and cells whose logs have equal bytes share one inode with the cache, so the first
    append of a logger first moves the file's content to a fresh inode (copy + rename)."""

    def __init__(self, path: str | Path | None = None, volatile_path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.volatile_path = Path(volatile_path) if volatile_path else None
        self.records: list[dict[str, float]] = []
        self._owned: set[Path] = set()
        for p in (self.path, self.volatile_path):
            if p:
                p.parent.mkdir(parents=True, exist_ok=True)

    def _own(self, path: Path) -> None:
        """Give ``path`` an inode of its own (same content) before this logger appends to it."""
        if path in self._owned:
            return
        if path.exists():
            data = path.read_bytes()
            with atomic_path(path) as tmp:
                tmp.write_bytes(data)
        self._owned.add(path)

    def log(self, metrics: dict[str, float], step: int) -> None:
        rec = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.records.append(rec)
        stable = {k: v for k, v in rec.items() if k not in VOLATILE_KEYS}
        volatile = {k: v for k, v in rec.items() if k in VOLATILE_KEYS}
        for path, row in ((self.path, stable), (self.volatile_path, volatile)):
            if path and (row is stable or volatile):
                self._own(path)
                with path.open("a") as f:
                    f.write(json.dumps({"step": rec["step"], **row} if row is volatile else row, sort_keys=True)
                            + "\n")

    def truncate(self, last_step: int) -> None:
        """Keep only records with ``step <= last_step`` (0: start afresh)."""
        self.records = [r for r in self.records if r["step"] <= last_step]
        for path in (self.path, self.volatile_path):
            if path and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= last_step]
                with atomic_path(path) as tmp:
                    tmp.write_text("".join(line + "\n" for line in kept))
                self._owned.add(path)  # a fresh inode


CHECKPOINT_DIR = "checkpoint"  # a cell's checkpoint directory inside its work directory


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

    def exists(self) -> bool:
        """Whether a checkpoint was saved (and not cleared): a run would resume rather than start afresh."""
        return self.directory is not None and all((self.directory / n).exists()
                                                  for n in ("checkpoint.safetensors", "checkpoint.json"))

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
    """Everything a method may use. Methods never see the val or test split, and read their hyperparameters only
    from ``params`` (the cell's fully resolved ``methods.<name>.<dataset>.b<budget>`` entry of params.yaml)."""

    train: TrainData
    student: StudentConfig
    budget: int
    seed: int
    params: dict[str, Any]
    device: str | torch.device = "cpu"
    experts: ExpertCollection | None = None
    prepared: Path | None = None  # data/prepared/<dataset>/<method>/: one sub-directory per Requirement.id
    logger: MetricLogger = field(default_factory=JsonlLogger)
    checkpoint: Checkpointer = field(default_factory=lambda: Checkpointer(None))
    dataset: str = ""

    def make_student(self, seed: int | None = None) -> DualEncoder:
        """A fresh student on the task's device."""
        return build_student(self.student, seed=seed, device=self.device)

    def require_experts(self, method: str) -> ExpertCollection:
        if self.experts is None:
            raise RuntimeError(f"method {method!r} needs expert trajectories: declare Requirement('experts') in its "
                               "requirements() and run `mmdd experts` first")
        return self.experts

    def prepared_dir(self, requirement: Requirement) -> Path | None:
        """Where the ``prepare`` stage built ``requirement`` (None when the task has no prepared root)."""
        if self.prepared is None:
            return None
        path = self.prepared / requirement.id
        if not path.is_dir():
            raise FileNotFoundError(f"{requirement.kind} artifact {requirement.id!r} is not in {self.prepared}: the "
                                    "method's requirements() must list it, then run `mmdd prepare`")
        return path


ANY_PROFILE = "*"


class Method:
    """Base class of a distillation method. Subclasses implement :meth:`distill` and register through the
    ``mmdd.methods`` entry-point group (in-tree methods too: see ``pyproject.toml``).

    ``defaults`` maps a *profile* (``quick``, ``paper``, ``tiny``, ...; ``"*"`` = every profile) to default
    hyperparameters; :meth:`default_params` may refine them by dataset and budget. These are read only by
    ``mmdd init-params``, which writes the resolved values into params.yaml; a method reads ``task.params`` only.
    An unknown profile is an error, never a silent fallback. The first line of the class docstring is the
    method's one-line description (``mmdd methods``).
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def description(cls) -> str:
        """First line of the class docstring, else of its module's docstring."""
        import sys

        for doc in (cls.__doc__, getattr(sys.modules.get(cls.__module__), "__doc__", None)):
            if doc and doc.strip() and doc is not Method.__doc__:
                return doc.strip().splitlines()[0]
        return cls.__module__

    @classmethod
    def profiles(cls) -> list[str]:
        return sorted(cls.defaults)

    @classmethod
    def default_params(cls, profile: str, dataset: str, budget: int) -> dict[str, Any]:
        if profile in cls.defaults:
            return dict(cls.defaults[profile])
        if ANY_PROFILE in cls.defaults:
            return dict(cls.defaults[ANY_PROFILE])
        raise ValueError(f"method {cls.name!r} has no defaults for profile {profile!r} (it knows "
                         f"{cls.profiles()}): add them to its `defaults`, or set every parameter under "
                         f"methods.{cls.name} in the preset")

    @classmethod
    def resolve_params(cls, profile: str, dataset: str, budget: int,
                       overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults for (profile, dataset, budget) with ``overrides`` applied; unknown override keys fail."""
        params = cls.default_params(profile, dataset, budget)
        for key, value in (overrides or {}).items():
            if key not in params:
                raise ValueError(f"method {cls.name!r} has no parameter {key!r}; known: {sorted(params)}")
            params[key] = value
        return params

    @classmethod
    def requirements(cls, params: dict[str, Any], budget: int) -> list[Requirement]:
        """What the method needs besides the training pairs, derived from its own resolved ``params``."""
        return []

    @classmethod
    def needs_experts(cls, params: dict[str, Any], budget: int) -> bool:
        return any(r.kind == EXPERTS for r in cls.requirements(params, budget))

    def distill(self, task: DistillTask) -> DistilledSet:  # pragma: no cover - interface
        raise NotImplementedError
