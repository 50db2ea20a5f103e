"""Expert trajectory files: both towers of one expert in one safetensors file, read lazily.

Layout of ``expert_{index:03d}.safetensors``: one flat float32 tensor per (tower, epoch), named
``img.e{epoch:03d}`` / ``txt.e{epoch:03d}``, plus optional per-pair statistics ``stats.<name>``. The JSON metadata
(parameter names, shapes, order, config hash, ...) is stored in the safetensors header and in a sidecar
``expert_{index:03d}.json``. safetensors memory-maps the file, so reading epoch e touches only that epoch's bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from benchmark.io import write_json, write_tensors

TOWERS = ("img", "txt")
FORMAT_VERSION = 1


def indexed_files(directory: Path, prefix: str, what: str, command: str) -> list[Path]:
    """``<prefix>_NNN.safetensors`` files of ``directory`` sorted by their explicit index; a clear error naming
    ``command`` when there are none."""
    name = re.compile(rf"^{re.escape(prefix)}_(\d{{3,}})\.safetensors$")
    files = sorted((int(m.group(1)), p) for p in directory.glob(f"{prefix}_*.safetensors") if (m := name.match(p.name)))
    if not files:
        raise FileNotFoundError(f"no {what} in {directory}: run `{command}` first")
    return [p for _, p in files]


def expert_path(directory: str | Path, index: int) -> Path:
    """Deterministic file path of expert ``index`` (no 'next free n')."""
    return Path(directory) / f"expert_{index:03d}.safetensors"


def tensor_key(tower: str, epoch: int) -> str:
    return f"{tower}.e{epoch:03d}"


def write_expert(path: str | Path, trajectory: dict[str, list[torch.Tensor]], meta: dict[str, Any],
                 stats: dict[str, torch.Tensor] | None = None) -> None:
    """Write one expert atomically. ``trajectory[tower][e]`` is the flat parameter vector after epoch e (0 = init)."""
    lengths = {len(trajectory[t]) for t in TOWERS}
    if len(lengths) != 1:
        raise ValueError(f"towers have different numbers of timestamps: {lengths}")
    tensors = {tensor_key(t, e): v.detach().float().reshape(-1) for t in TOWERS for e, v in enumerate(trajectory[t])}
    for name, v in (stats or {}).items():
        tensors[f"stats.{name}"] = v
    meta = dict(meta, format_version=FORMAT_VERSION, num_timestamps=lengths.pop())
    write_tensors(path, tensors, metadata={"mmdd": json.dumps(meta, sort_keys=True)})
    write_json(Path(path).with_suffix(".json"), meta)


@dataclass
class ExpertTrajectory:
    """Lazy reader of one expert file. Tensors are read on demand; nothing is cached."""

    path: Path
    meta: dict[str, Any]
    bytes_read: int = 0

    @classmethod
    def open(cls, path: str | Path) -> "ExpertTrajectory":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"expert file {path} is missing: run `mmdd experts` first")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["mmdd"])
        except Exception as exc:
            raise ValueError(f"expert file {path} is corrupt or not an mmdd expert ({exc}); delete it and rerun "
                             f"`mmdd experts`") from exc
        return cls(path, meta)

    @property
    def num_timestamps(self) -> int:
        return int(self.meta["num_timestamps"])

    @property
    def index(self) -> int:
        return int(self.meta["index"])

    def read(self, tower: str, epoch: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Flat parameters of ``tower`` ('img' or 'txt') after ``epoch`` epochs (0 = initialisation)."""
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        if not 0 <= epoch < self.num_timestamps:
            raise IndexError(f"{self.path.name} has epochs 0..{self.num_timestamps - 1}, asked for {epoch}")
        with safe_open(str(self.path), framework="pt", device=str(device)) as f:
            t = f.get_tensor(tensor_key(tower, epoch))
        self.bytes_read += t.numel() * t.element_size()
        return t

    def read_epoch(self, epoch: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        return {t: self.read(t, epoch, device) for t in TOWERS}

    def stat(self, name: str) -> torch.Tensor:
        """A per-pair statistic recorded during training (e.g. ``forget_count``)."""
        with safe_open(str(self.path), framework="pt") as f:
            key = f"stats.{name}"
            if key not in f.keys():
                raise KeyError(f"{self.path.name} has no statistic {name!r}")
            return f.get_tensor(key)


class ExpertCollection:
    """All experts in a directory, sorted by their explicit index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        paths = indexed_files(self.directory, "expert", "expert trajectories", "mmdd experts")
        self.experts = [ExpertTrajectory.open(p) for p in paths]

    def __len__(self) -> int:
        return len(self.experts)

    def __getitem__(self, k: int) -> ExpertTrajectory:
        return self.experts[k]

    def __iter__(self):
        return iter(self.experts)

    @property
    def meta(self) -> dict[str, Any]:
        return self.experts[0].meta

    @property
    def bytes_read(self) -> int:
        return sum(e.bytes_read for e in self.experts)
