"""Teachers: where θ_start and θ_target of an iteration come from.

Both kinds read only the two epochs an iteration needs (``start`` and ``start + expert_epochs``) from memory-mapped
files — never a whole expert — and keep recently used epochs in a small LRU cache (``teacher_cache_mb``) on the
engine's device, so the typical working set (epochs in [min_start, max_start + E] of every expert, docs/methods.md B27) is read
from disk once when it fits.

* :class:`RawTeacher` — the expert trajectories themselves.
* :class:`HeadExpertTeacher` — the prepared head-only experts of the ``heads`` student (RepBlend).
* :class:`ShortcutTeacher` — PTM-ST shortcut trajectories (``shortcut(start, end)``), from the compact files of
  ``mmdd prepare`` (the harness passes their directory), else computed in memory from the raw experts.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from benchmark.experts.store import TOWERS, ExpertCollection
from methods.matching.config import TeacherSpec
from methods.matching.shortcut import ShortcutCollection, ShortcutTrajectory

log = logging.getLogger(__name__)


class Teacher:
    """Base: ``endpoints(k, start, E)`` → (θ_start, θ_target) per tower, read lazily with an LRU cache."""

    kind = "base"

    def __init__(self, cache_mb: int = 512):
        self.cache_bytes = int(cache_mb) * 2**20
        self._cache: OrderedDict[tuple[int, str, int, str], torch.Tensor] = OrderedDict()
        self._cached = 0
        self.hits = 0
        self.misses = 0

    # subclasses -----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def first_epoch(self) -> int:
        raise NotImplementedError

    @property
    def last_epoch(self) -> int:
        raise NotImplementedError

    def _read(self, k: int, tower: str, epoch: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    @property
    def bytes_read(self) -> int:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def numel(self, tower: str) -> int:
        return int(self.read(0, tower, self.first_epoch, "cpu").numel())

    # shared -------------------------------------------------------------------------------------------------------
    def read(self, k: int, tower: str, epoch: int, device: str | torch.device) -> torch.Tensor:
        device = torch.device(device)
        key = (k, tower, epoch, str(device))
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        t = self._read(k, tower, epoch, device)
        size = t.numel() * t.element_size()
        if size <= self.cache_bytes:
            while self._cached + size > self.cache_bytes and self._cache:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.numel() * old.element_size()
            self._cache[key] = t
            self._cached += size
        return t

    def endpoints(self, k: int, start: int, expert_epochs: int, device: str | torch.device,
                  dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(θ_start, θ_target) of expert ``k`` with target epoch ``start + expert_epochs``."""
        target = start + expert_epochs
        if start < self.first_epoch or target > self.last_epoch:
            raise IndexError(f"{self.kind} teacher covers epochs {self.first_epoch}..{self.last_epoch}; start {start} "
                             f"+ expert_epochs {expert_epochs} is outside")
        th0 = {t: self.read(k, t, start, device).to(dtype) for t in TOWERS}
        th1 = {t: self.read(k, t, target, device).to(dtype) for t in TOWERS}
        return th0, th1

    def check_window(self, min_start: int, max_start: int, expert_epochs: int, where: str = "phase") -> None:
        """Fail early, naming the fix, when the start window does not fit the trajectories."""
        if min_start < self.first_epoch or max_start - 1 + expert_epochs > self.last_epoch:
            raise ValueError(
                f"{where}: start epochs [{min_start}, {max_start}) with expert_epochs={expert_epochs} need epochs "
                f"up to {max_start - 1 + expert_epochs}, but the {self.kind} teacher covers {self.first_epoch}.."
                f"{self.last_epoch}: narrow start_window or train longer experts (`mmdd experts`)")


class RawTeacher(Teacher):
    kind = "raw"

    def __init__(self, experts: ExpertCollection, cache_mb: int = 512):
        super().__init__(cache_mb)
        self.experts = experts
        stamps = {e.num_timestamps for e in experts}
        self._last = min(stamps) - 1
        if len(stamps) > 1:
            log.warning("experts in %s have different lengths %s; using epochs up to %d", experts.directory,
                        sorted(stamps), self._last)

    def __len__(self) -> int:
        return len(self.experts)

    @property
    def first_epoch(self) -> int:
        return 0

    @property
    def last_epoch(self) -> int:
        return self._last

    def _read(self, k, tower, epoch, device):
        return self.experts[k].read(tower, epoch, device)

    @property
    def bytes_read(self) -> int:
        return self.experts.bytes_read

    def describe(self) -> dict[str, Any]:
        # names, not absolute paths: the record is the same wherever the project lives
        return {"kind": "raw", "experts_dir": self.experts.directory.name, "experts": len(self.experts),
                "epochs": [0, self._last], "config_hash": self.experts.meta.get("config_hash")}


class ShortcutTeacher(Teacher):
    kind = "shortcut"

    def __init__(self, trajectories: list[ShortcutTrajectory], source: str, cache_mb: int = 512,
                 config_hash: str | None = None):
        super().__init__(cache_mb)
        if not trajectories:
            raise ValueError("a shortcut teacher needs at least one trajectory")
        self.trajectories = trajectories
        self.source = source
        self.config_hash = config_hash
        segs = {(t.start, t.end) for t in trajectories}
        if len(segs) != 1:
            raise ValueError(f"shortcut trajectories cover different segments {sorted(segs)}; rebuild them with one "
                             "(start, end)")
        self.start, self.end = segs.pop()

    def __len__(self) -> int:
        return len(self.trajectories)

    @property
    def first_epoch(self) -> int:
        return self.start

    @property
    def last_epoch(self) -> int:
        return self.end

    def _read(self, k, tower, epoch, device):
        return self.trajectories[k].read(tower, epoch, device)

    @property
    def bytes_read(self) -> int:
        return sum(t.bytes_read for t in self.trajectories) + sum(
            t.expert.bytes_read for t in self.trajectories if t.expert is not None)

    def describe(self) -> dict[str, Any]:
        source = self.source if self.source.startswith("in-memory") else Path(self.source).name
        return {"kind": "shortcut", "start": self.start, "end": self.end, "source": source,
                "experts": len(self.trajectories), "config_hash": self.config_hash}


class HeadExpertTeacher(RawTeacher):
    """The head-only experts of ``student = heads`` (:mod:`.heads`), prepared by ``mmdd prepare``."""

    kind = "head-experts"

    def describe(self) -> dict[str, Any]:
        return dict(super().describe(), kind=self.kind, encoder=self.experts.meta.get("encoder"))


def make_teacher(spec: TeacherSpec, experts: ExpertCollection, shortcut_dir: str | Path | None = None,
                 cache_mb: int = 512, layer_numels: dict[str, list[int]] | None = None) -> Teacher:
    """The teacher of ``spec`` over ``experts``.

    For ``shortcut(start, end)`` with ``shortcut_dir`` (the harness's prepared artifact): the files built there by
    ``mmdd prepare``, which must cover every expert with this segment and config hash — anything else is an error
    naming the fix, never a silent rebuild. Without ``shortcut_dir`` (library use, tests) the β tables are computed
    in memory from the raw experts: the same trajectories, only slower to set up."""
    if spec.kind == "raw":
        return RawTeacher(experts, cache_mb)
    assert spec.end is not None
    cfg_hash = experts.meta.get("config_hash")
    if shortcut_dir is not None:
        directory = Path(shortcut_dir)
        trajs = list(ShortcutCollection(directory)) if directory.is_dir() else []
        problems = []
        if sorted(t.index for t in trajs) != sorted(e.index for e in experts):
            problems.append(f"expert indices {sorted(t.index for t in trajs)} vs {sorted(e.index for e in experts)}")
        if any((t.start, t.end) != (spec.start, spec.end) for t in trajs):
            problems.append(f"segments other than {spec}")
        if any(t.meta.get("source_config_hash") != cfg_hash for t in trajs):
            problems.append("another expert configuration")
        if problems:
            raise ValueError(f"shortcut files in {directory} do not match the experts in {experts.directory} "
                             f"({'; '.join(problems)}): rerun `mmdd prepare` for this method")
        return ShortcutTeacher(trajs, str(directory), cache_mb, cfg_hash)
    log.info("no prepared shortcut files for %s; computing the β tables in memory from the raw experts", spec)
    trajs = [ShortcutTrajectory.from_expert(e, spec.start, spec.end, layer_numels) for e in experts]
    return ShortcutTeacher(trajs, f"in-memory from {experts.directory}", cache_mb, cfg_hash)
