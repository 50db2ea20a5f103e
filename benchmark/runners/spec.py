"""What a runner needs to run one grid cell (:class:`CellSpec`) and the sandbox's resource limits
(:class:`SandboxLimits`). Plain data: nothing here imports :mod:`benchmark.pipeline`.

Limits come from the caller (later the ``sandbox:`` section of params.yaml); :meth:`SandboxLimits.from_env` applies
the ``MMDD_DOCKER_*`` overrides listed in :data:`ENV_OVERRIDES` on top of them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": GIB, "t": 1 << 40}

#: environment variable -> SandboxLimits field it overrides
ENV_OVERRIDES = {
    "MMDD_DOCKER_TIMEOUT": "timeout_s",
    "MMDD_DOCKER_MEMORY": "memory_bytes",
    "MMDD_DOCKER_PIDS": "pids_limit",
    "MMDD_DOCKER_CPUS": "cpus",
    "MMDD_DOCKER_TMP_SIZE": "tmp_bytes",
    "MMDD_DOCKER_SHM_SIZE": "shm_bytes",
    "MMDD_DOCKER_OUT_MAX": "out_max_bytes",
    "MMDD_DOCKER_OUT_FILES": "out_max_files",
    "MMDD_DOCKER_POLL": "poll_s",
}
_SIZE_FIELDS = {"memory_bytes", "tmp_bytes", "shm_bytes", "out_max_bytes"}


def parse_size(value: str | int, what: str) -> int:
    """Bytes from ``123``, ``512m``, ``8g`` or ``8GiB`` (binary units); ``what`` names the setting in errors."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", str(value).lower())
    if not m:
        raise ValueError(f"{what}={value!r} is not a size: write e.g. 512m, 8g or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _host_cpus() -> float:
    return float(os.cpu_count() or 1)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one method container. Defaults suit a paper-preset cell on a GPU node."""

    timeout_s: float = 24 * 3600.0  # wall clock of the container, then it is killed
    memory_bytes: int = 32 * GIB  # --memory (swap disabled); /tmp and /dev/shm count against it
    pids_limit: int = 4096  # --pids-limit: processes and threads
    cpus: float = field(default_factory=_host_cpus)  # --cpus
    tmp_bytes: int = 8 * GIB  # size of the /tmp tmpfs
    shm_bytes: int = 2 * GIB  # --shm-size (/dev/shm, DataLoader workers)
    out_max_bytes: int = 16 * GIB  # total bytes under /out (checkpoints included); also the per-file size limit
    out_max_files: int = 10_000  # entries under /out
    poll_s: float = 2.0  # how often /out and the deadline are checked while the container runs

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"sandbox.{f.name} must be a positive number, got {v!r}")
        for name in ("memory_bytes", "pids_limit", "tmp_bytes", "shm_bytes", "out_max_bytes", "out_max_files"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"sandbox.{name} must be an integer, got {getattr(self, name)!r}")

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any] | None) -> SandboxLimits:
        """Limits from a ``sandbox:`` mapping (sizes may be strings such as ``8g``); unknown keys are errors."""
        doc = dict(doc or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ValueError(f"unknown sandbox setting(s) {unknown}: valid keys are {sorted(known)}")
        return cls(**{k: _coerce(k, v, f"sandbox.{k}") for k, v in doc.items()})

    @classmethod
    def from_env(cls, base: SandboxLimits | None = None, environ: Mapping[str, str] | None = None) -> SandboxLimits:
        """``base`` (default: the defaults) with every ``MMDD_DOCKER_*`` override of :data:`ENV_OVERRIDES` set."""
        environ = os.environ if environ is None else environ
        changes = {name: _coerce(name, environ[var], var) for var, name in ENV_OVERRIDES.items()
                   if environ.get(var, "").strip()}
        return replace(base or cls(), **changes)


def _coerce(name: str, value: Any, what: str) -> int | float:
    if name in _SIZE_FIELDS:
        return parse_size(value, what)
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}={value!r} must be a number") from None
    if name in ("pids_limit", "out_max_files"):
        if num != int(num):
            raise ValueError(f"{what}={value!r} must be an integer")
        return int(num)
    return num


@dataclass(frozen=True)
class CellSpec:
    """One grid cell as a runner sees it.

    ``work_dir`` is the cell directory on the host (the runner writes its scratch space below it); ``config_doc``
    the validated configuration (:func:`config_document`), handed to the method read-only; ``mounts`` the
    train-only inputs as ``(host path, container path)`` pairs (:func:`benchmark.runners.inputs.train_mounts`).
    """

    dataset: str
    method: str
    budget: int
    seed: int
    device: str
    data_root: Path
    work_dir: Path
    config_doc: dict[str, Any] = field(hash=False)
    mounts: tuple[tuple[Path, str], ...] = ()
    limits: SandboxLimits = field(default_factory=SandboxLimits)

    @property
    def preset(self) -> str:
        return str(self.config_doc.get("preset", ""))

    @property
    def cell_id(self) -> str:
        """Stable name of the cell on this machine (the ``mmdd.cell`` container label): the cell's coordinates
        plus a hash of its directory, so two result roots never collide."""
        where = hashlib.sha256(str(Path(self.work_dir).resolve()).encode()).hexdigest()[:10]
        return f"{self.preset}/{self.dataset}/{self.method}/b{self.budget}/s{self.seed}@{where}"


def config_document(cfg: Any, tower_config: Mapping[str, Any]) -> dict[str, Any]:
    """A :class:`benchmark.config.BenchConfig` as a plain mapping that ``config_from_dict`` accepts, with the
    student's tower config resolved (the container needs no host file). Raises if it does not round-trip."""
    from benchmark.config import config_from_dict

    doc = _plain(cfg)
    doc["student"]["tower_config"] = dict(tower_config)
    again = _plain(config_from_dict(yaml.safe_load(config_text(doc))))
    if json.dumps(again, sort_keys=True) != json.dumps(doc, sort_keys=True):
        diff = sorted(k for k in doc if json.dumps(doc[k]) != json.dumps(again.get(k)))
        raise ValueError(f"the configuration does not survive serialisation (sections {diff}); a separate process "
                         "could not reproduce it: use --runner local")
    return doc


def _plain(cfg: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(cfg):
        if not f.init:
            continue
        v = getattr(cfg, f.name)
        out[f.name] = {k.name: getattr(v, k.name) for k in fields(v) if k.init} if is_dataclass(v) else v
    return json.loads(json.dumps(out, default=lambda o: asdict(o) if is_dataclass(o) else str(o)))


def config_text(doc: Mapping[str, Any]) -> str:
    """The YAML file a method process reads (``mmdd run-method --preset <file>``)."""
    return yaml.safe_dump(dict(doc), sort_keys=True)
