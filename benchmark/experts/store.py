"""Expert trajectory files: both towers of one expert in one safetensors file, read lazily and verified.

Layout of ``expert_{index:03d}.safetensors``: one flat float32 tensor per (tower, epoch), named
``img.e{epoch:03d}`` / ``txt.e{epoch:03d}``, plus optional per-pair statistics ``stats.<name>``. The JSON metadata
(parameter names, shapes, order, config hash, ...) is stored in the safetensors header and in a sidecar
``expert_{index:03d}.json``. safetensors memory-maps the file, so reading epoch e touches only that epoch's bytes.

Integrity (any file pair written by :func:`write_checked`, experts and shortcut teachers alike):

* the header metadata also holds the sha256 of every tensor's bytes (``tensor_sha256``, one metadata key so the
  header bytes stay deterministic);
* the sidecar is written *last* and holds the sha256 of the whole tensor file and of its header. A pair is complete
  only when both files exist, the sidecar's metadata equals the header's and the hashes match
  (:func:`content_problem`, one full pass: what ``mmdd experts`` runs before calling an expert up to date);
* a reader checks the header against the sidecar on open (a few KB) and each tensor against its recorded sha256 the
  first time this process reads it (:func:`read_checked`), so epochs that are never requested are never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from benchmark.constants import TOWERS
from benchmark.io import read_json, write_json, write_tensors

FORMAT_VERSION = 2  # 2: per-tensor sha256 in the header, file and header sha256 in the sidecar
DIGESTS_KEY = "tensor_sha256"
_CHUNK = 1 << 20
_READ_BYTES = [0]  # tensor bytes read through read_checked in this process (a cost measurement, never hashed)
_VERIFIED: set[tuple[Any, ...]] = set()  # (file identity, tensor key) pairs whose hash this process has checked


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


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def tensor_key(tower: str, epoch: int) -> str:
    return f"{tower}.e{epoch:03d}"


# ---------------------------------------------------------------------------------------------------- integrity
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, little-endian)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def header_sha256(path: str | Path) -> str:
    """sha256 of a safetensors file's length prefix and JSON header (tensor table and metadata)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError("file is shorter than a safetensors length prefix")
        (n,) = struct.unpack("<Q", prefix)
        header = f.read(min(n, 100 << 20))
    return hashlib.sha256(prefix + header).hexdigest()


def write_checked(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``tensors`` (with ``meta`` and per-tensor hashes in the header), then the sidecar with the file hashes.

    The old sidecar is removed first, so a crash at any point leaves a pair that :func:`content_problem` rejects."""
    path = Path(path)
    sidecar_path(path).unlink(missing_ok=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    doc = dict(meta, **{DIGESTS_KEY: {k: tensor_sha256(v) for k, v in flat.items()}})
    write_tensors(path, flat, metadata={"mmdd": json.dumps(doc, sort_keys=True)})
    write_json(sidecar_path(path), dict(doc, sha256={"file": file_sha256(path), "header": header_sha256(path)}))


def _read_sidecar(path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.exists():
        raise ValueError(f"has no sidecar {side.name} (its write was interrupted)")
    try:
        doc = read_json(side)
        recorded = doc["sha256"]
        if not isinstance(recorded, dict) or not {"file", "header"} <= set(recorded):
            raise KeyError("sha256.file/header")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"has an unreadable sidecar {side.name} or one without content hashes, as written by an "
                         f"older version ({type(exc).__name__}: {exc})") from exc
    return doc


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            doc = json.loads((f.metadata() or {})["mmdd"])
        if not isinstance(doc.get(DIGESTS_KEY), dict):
            raise KeyError(DIGESTS_KEY)
        return doc
    except Exception as exc:
        raise ValueError(f"is not a readable mmdd file ({type(exc).__name__}: {exc})") from exc


def _checked_header(path: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """(header meta, per-tensor digests, sidecar) once the header matches the sidecar; ValueError saying why not."""
    doc = _read_sidecar(path)
    if header_sha256(path) != doc["sha256"]["header"]:
        raise ValueError(f"has a header that does not match the sha256 recorded in {sidecar_path(path).name} "
                         "(corrupt, or its sidecar is stale)")
    meta = _read_header(path)
    if {k: v for k, v in doc.items() if k != "sha256"} != meta:
        raise ValueError(f"has metadata that differs from its sidecar {sidecar_path(path).name} (stale sidecar)")
    digests = meta.pop(DIGESTS_KEY)
    return meta, digests, doc


def content_problem(path: str | Path) -> str | None:
    """Why the file pair at ``path`` is not complete and intact, or None: header, sidecar and a full content hash."""
    path = Path(path)
    if not path.exists():
        return "is missing"
    try:
        _, _, doc = _checked_header(path)
    except ValueError as exc:
        return str(exc)
    if file_sha256(path) != doc["sha256"]["file"]:
        return f"has content that does not match the sha256 recorded in {sidecar_path(path).name} (corrupt)"
    return None


def recorded_sha256(path: str | Path) -> str | None:
    """The whole-file sha256 recorded in ``path``'s sidecar (None when there is none)."""
    try:
        return str(read_json(sidecar_path(path))["sha256"]["file"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def open_checked(path: str | Path, what: str, command: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(metadata, per-tensor digests) of a file pair whose header matches its sidecar; errors name the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} file {path} is missing: run `{command}` first")
    try:
        meta, digests, _ = _checked_header(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{what} file {path} is corrupt or incomplete: it {exc}; rerun `{command}`, which "
                         "rewrites it") from exc
    return meta, digests


def _identity(path: Path) -> tuple[int, ...]:
    """This version of the file: a rewrite (new inode via rename) or an in-place change (times) is a new version."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def bytes_read_total() -> int:
    """Tensor bytes read through :func:`read_checked` by this process so far (experts, shortcuts, head experts):
    the distill stage's ``expert_bytes_read`` is its difference over a method's run."""
    return _READ_BYTES[0]


def read_checked(path: Path, key: str, digests: dict[str, str], device: str | torch.device, what: str,
                 command: str) -> torch.Tensor:
    """Tensor ``key`` of ``path``; on its first read in this process (per file version) its bytes are hashed and
    compared with ``digests[key]``."""
    ident = (_identity(path), key)
    if ident in _VERIFIED:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            t = f.get_tensor(key)
        _READ_BYTES[0] += t.numel() * t.element_size()
        return t
    with safe_open(str(path), framework="pt") as f:
        t = f.get_tensor(key)
    _READ_BYTES[0] += t.numel() * t.element_size()
    if digests.get(key) != tensor_sha256(t):
        raise ValueError(f"{what} file {path} is corrupt: tensor {key!r} does not match the sha256 recorded when it "
                         f"was written; rerun `{command}`, which rewrites it")
    _VERIFIED.add(ident)
    return t.to(device)


# ---------------------------------------------------------------------------------------------------- experts
def write_expert(path: str | Path, trajectory: dict[str, list[torch.Tensor]], meta: dict[str, Any],
                 stats: dict[str, torch.Tensor] | None = None) -> None:
    """Write one expert (tensor file, then sidecar; see :func:`write_checked`). ``trajectory[tower][e]`` is the flat
    parameter vector after epoch e (0 = init)."""
    lengths = {len(trajectory[t]) for t in TOWERS}
    if len(lengths) != 1:
        raise ValueError(f"towers have different numbers of timestamps: {lengths}")
    tensors = {tensor_key(t, e): v.detach().float().reshape(-1) for t in TOWERS for e, v in enumerate(trajectory[t])}
    for name, v in (stats or {}).items():
        tensors[f"stats.{name}"] = v
    meta = dict(meta, format_version=FORMAT_VERSION, num_timestamps=lengths.pop())
    write_checked(path, tensors, meta)


def expert_problem(path: str | Path, config_hash: str) -> str | None:
    """Why expert ``path`` must be (re)trained for ``config_hash``, or None when it is complete, intact and current."""
    problem = content_problem(path)
    if problem is None and read_json(sidecar_path(path)).get("config_hash") != config_hash:
        problem = "was trained with another configuration"
    return problem


@dataclass
class ExpertTrajectory:
    """Lazy reader of one expert file. Tensors are read (and, once per process, hash-checked) on demand; nothing is
    cached."""

    path: Path
    meta: dict[str, Any]
    bytes_read: int = 0
    digests: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> "ExpertTrajectory":
        """Open ``path`` after checking its header against its sidecar; tensors are verified when first read."""
        meta, digests = open_checked(path, "expert", "mmdd experts")
        return cls(Path(path), meta, digests=digests)

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
        t = read_checked(self.path, tensor_key(tower, epoch), self.digests, device, "expert", "mmdd experts")
        self.bytes_read += t.numel() * t.element_size()
        return t

    def stat(self, name: str) -> torch.Tensor:
        """A per-pair statistic recorded during training (e.g. ``forget_count``)."""
        key = f"stats.{name}"
        if key not in self.digests:
            raise KeyError(f"{self.path.name} has no statistic {name!r}")
        return read_checked(self.path, key, self.digests, "cpu", "expert", "mmdd experts")


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
