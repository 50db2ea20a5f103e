"""Docker for tests: is a daemon answering, and the CPU test image (built once by ``containers/build.sh``).

Without Docker the container tests skip with the reason; with ``MMDD_REQUIRE_DOCKER=1`` (set by ``.ci/run`` once
``.ci/docker-setup.sh`` has started the engine) they fail instead, so CI cannot silently skip them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import pytest

from benchmark.runners.images import docker_unavailable_reason, inspect_image, suite_image

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "containers" / "Dockerfile.cpu"
TEST_IMAGE = suite_image("cpu-test")

def required() -> bool:
    return os.environ.get("MMDD_REQUIRE_DOCKER") == "1"

def unavailable(reason: str):
    """Skip (printing the reason), or fail when Docker is required."""
    if required():
        pytest.fail(f"MMDD_REQUIRE_DOCKER=1 but {reason}")
    pytest.skip(reason)

@lru_cache(maxsize=1)
def _ensure_image() -> tuple[str | None, str]:
    reason = docker_unavailable_reason()
    if reason:
        return None, f"Docker unavailable: {reason}"
    want = hashlib.sha256(DOCKERFILE.read_bytes()).hexdigest()[:16]
    info = inspect_image(TEST_IMAGE)
    if info is not None and info.labels.get("org.mmdd.dockerfile-sha") == want:
        return TEST_IMAGE, ""
    t0 = time.perf_counter()
    proc = subprocess.run([str(REPO / "containers" / "build.sh"), "cpu-test"], capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0:
        return None, f"building {TEST_IMAGE} failed: {proc.stderr.strip()[-1500:]}"
    log.info("built %s in %.0f s", TEST_IMAGE, time.perf_counter() - t0)
    return TEST_IMAGE, ""

def cpu_test_image() -> str:
    """The CPU test image's tag (building it when missing or stale); skips or fails when impossible."""
    tag, reason = _ensure_image()
    if tag is None:
        unavailable(reason)
    return tag

def image_if_available() -> str | None:
    """The test image's tag, or None when Docker is unavailable (fails instead when Docker is required)."""
    tag, reason = _ensure_image()
    if tag is None and required():
        pytest.fail(f"MMDD_REQUIRE_DOCKER=1 but {reason}")
    return tag



def cell_spec(bench, method: str, work_dir: Path, budget: int = 10, seed: int = 0, ds: str = "shapes",
              limits=None):
    """The CellSpec the distill stage hands a runner, for driving a runner (or its probe) directly."""
    from benchmark.runners.inputs import train_mounts
    from benchmark.runners.spec import CellSpec, SandboxLimits, config_document

    return CellSpec(dataset=ds, method=method, budget=budget, seed=seed, device=str(bench.device),
                    data_root=bench.layout.data_root, work_dir=work_dir,
                    config_doc=config_document(bench.cfg, bench.student.tower_config),
                    mounts=train_mounts(bench.layout, ds, bench.cfg.text_encoder, bench.cfg.student.tower, method),
                    limits=limits or SandboxLimits())
