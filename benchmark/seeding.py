"""Seeding helpers: every random stream the suite uses is derived from an explicit seed."""

from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from a tuple of ints/strings (independent of PYTHONHASHSEED)."""
    import hashlib

    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy/random from torch's per-worker seed."""
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


def seeded(seed: int):
    """Context manager: run a block with torch's global RNG (CPU and CUDA) seeded to ``seed``, restoring it after.

    Needed for code that draws from the global generator internally (dropout masks).
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    ctx = torch.random.fork_rng(devices=devices)

    class _Seeded:
        def __enter__(self):
            ctx.__enter__()
            torch.manual_seed(seed)
            return self

        def __exit__(self, *exc):
            return ctx.__exit__(*exc)

    return _Seeded()
