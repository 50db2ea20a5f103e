"""The environment that produced a table, as far as it decides the bytes of the results (docs/reproducibility.md):
interpreter, the pinned lock, the numerics libraries, torch's CPU kernel family and thread count.

Deliberately absent: host names, CPU model strings, core counts and timestamps — they differ between machines that
compute identical bytes, and the record is itself a tracked output."""

from __future__ import annotations

import hashlib
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "torchvision", "numpy", "pillow", "safetensors", "transformers", "matplotlib", "timm",
            "open_clip_torch", "dvc", "mlflow")


def _version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment_record(root: Path) -> dict[str, Any]:
    """What the results of this process depend on besides their inputs."""
    import torch

    lock = Path(root) / "requirements.lock"
    return {
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "machine": platform.machine(),
        "requirements_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else None,
        "packages": {name: _version(name) for name in PACKAGES},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }
