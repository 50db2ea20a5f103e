"""What a method needs besides the training pairs, and the generic machinery that prepares it.

A method declares its needs from its own resolved params (:meth:`benchmark.interface.Method.requirements`):

* ``Requirement("experts")`` — the dataset's expert trajectories (the shared ``experts`` stage trains them);
* ``Requirement(kind, spec)`` for any other kind — an artifact that the ``prepare`` stage builds into
  ``data/prepared/<dataset>/<method>/<requirement id>/`` with the builder registered for ``kind``.

Artifact builders register through the ``mmdd.artifacts`` entry-point group (each names an :class:`ArtifactKind`
subclass), exactly like methods register through ``mmdd.methods``; the harness never names a kind. Adding a method
that needs a new kind of artifact touches the method's own module (the builder and the requirement) and the one
entry-point table in ``pyproject.toml``; see docs/architecture.md.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

if TYPE_CHECKING:
    from benchmark.interface import TrainData
    from benchmark.models.student import StudentConfig

log = logging.getLogger(__name__)
ARTIFACT_GROUP = "mmdd.artifacts"
EXPERTS = "experts"


@dataclass(frozen=True)
class Requirement:
    """One thing a method needs: ``kind`` names an artifact kind, ``spec`` (JSON-able) its parameters."""

    kind: str
    spec: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kind: str, **spec: Any) -> "Requirement":
        return cls(kind, tuple(sorted(spec.items())))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.spec)

    @property
    def id(self) -> str:
        """A directory-safe name: ``shortcut-start0-end3``."""
        parts = [self.kind] + [f"{k}{_slug(v)}" for k, v in self.spec]
        return "-".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "spec": self.params, "id": self.id}


def _slug(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", json.dumps(value) if not isinstance(value, str) else value).strip("_")


@dataclass
class BuildContext:
    """What an artifact builder receives.

    ``experts_dir``: the dataset's experts; ``out_dir``: where to write; ``student``: the task's student config;
    ``device``: where to compute. Kinds with ``needs_train_data`` also get ``load_train`` — the TRAINING pairs,
    loaded on first :meth:`train_pairs` call (a builder whose files are current never loads them) — and
    ``train_id``, the identity of that data. Nothing here reaches the val or test split."""

    experts_dir: Path
    out_dir: Path
    progress: bool = True
    student: StudentConfig | None = None
    device: str = "cpu"
    load_train: Callable[[], TrainData] | None = None
    train_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _train: TrainData | None = field(default=None, init=False, repr=False)

    def train_pairs(self) -> TrainData:
        """The training pairs (loaded once, on first use); an error names the fix when the kind did not ask."""
        if self.load_train is None:
            raise RuntimeError(f"the builder of {self.out_dir.name} reads the training pairs, but its ArtifactKind "
                               "does not declare them: set `needs_train_data = True` on the class")
        if self._train is None:
            self._train = self.load_train()
        return self._train


class ArtifactKind:
    """Base class of a preparable artifact kind. Subclasses set ``kind`` and implement :meth:`build`.

    ``needs_train_data = True``: the builder reads the training pairs (:meth:`BuildContext.train_pairs`); the
    harness then passes them, records their identity in the prepared manifest, and makes ``data/raw/<ds>`` and
    ``data/features/<ds>`` deps of ``prepare-<method>`` so that editing the data rebuilds the artifact."""

    kind: ClassVar[str] = ""
    needs_train_data: ClassVar[bool] = False

    def build(self, requirement: Requirement, ctx: BuildContext) -> dict[str, Any]:  # pragma: no cover - interface
        """Build the artifact into ``ctx.out_dir`` (idempotent); return a JSON-able summary (sizes, files)."""
        raise NotImplementedError


def artifact_kinds() -> dict[str, type[ArtifactKind]]:
    """Every registered artifact kind (``mmdd.artifacts`` entry points)."""
    kinds: dict[str, type[ArtifactKind]] = {}
    for ep in entry_points(group=ARTIFACT_GROUP):
        try:
            cls = ep.load()
        except Exception as exc:  # a broken plug-in must not hide the others
            log.warning("artifact entry point %s=%s failed to load: %s", ep.name, ep.value, exc)
            continue
        if not (isinstance(cls, type) and issubclass(cls, ArtifactKind)):
            log.warning("artifact entry point %s=%s is not an ArtifactKind subclass; ignored", ep.name, ep.value)
            continue
        kinds[ep.name] = cls
    return kinds


def get_artifact_kind(kind: str) -> ArtifactKind:
    """An instance of the builder registered for ``kind``; a clear error lists the choices."""
    kinds = artifact_kinds()
    if kind not in kinds:
        raise ValueError(f"no artifact builder is registered for requirement kind {kind!r} (known: "
                         f"{sorted(kinds)}): register one under the {ARTIFACT_GROUP!r} entry-point group")
    return kinds[kind]()


def prepared_kinds(requirements: list[Requirement]) -> list[Requirement]:
    """The requirements the ``prepare`` stage builds (all but the shared experts), without repeats, in order."""
    out: list[Requirement] = []
    for r in requirements:
        if r.kind != EXPERTS and r not in out:
            out.append(r)
    return out
