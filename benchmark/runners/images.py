"""Docker images for method runs: the suite image, an entry's own image (built from its Dockerfile), their labels.

Images describe how Python runs inside them through labels set by ``containers/Dockerfile.*``:

- ``org.mmdd.python-env``: ``image`` (the suite is installed in the image) or ``host`` (a thin test image; the
  runner mounts this machine's virtual environment read-only);
- ``org.mmdd.python-bin``: the interpreter to start; ``org.mmdd.python``: its ``major.minor`` version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from benchmark import __version__

log = logging.getLogger(__name__)

SUITE_REPO = "mmdd-bench"
ENTRY_REPO = "mmdd-entry"
_SKIP_DIRS = {".git", "__pycache__", ".venv", ".pytest_cache", ".mypy_cache", "node_modules"}


class DockerError(RuntimeError):
    """Docker is missing or refused a step; the message names the fix."""


def suite_image(kind: str = "gpu") -> str:
    """Tag of the suite image of this version: ``mmdd-bench:<version>-<kind>`` (kind: gpu, cpu-test)."""
    return f"{SUITE_REPO}:{__version__}-{kind}"


def docker_cli() -> str:
    """The docker client (``MMDD_DOCKER`` or ``docker`` on PATH)."""
    exe = os.environ.get("MMDD_DOCKER", "docker")
    path = shutil.which(exe)
    if path is None:
        raise DockerError(f"docker client {exe!r} not found: install Docker (Debian: apt-get install docker.io) "
                          "or use --runner local")
    return path


def docker(*args: str, timeout: float | None = 120, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``docker args...`` and capture its output; raise :class:`DockerError` with stderr when ``check``."""
    cmd = [docker_cli(), *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as exc:
        raise DockerError(f"`docker {args[0]}` did not answer within {timeout} s: is the daemon healthy?") from exc
    if check and proc.returncode != 0:
        raise DockerError(f"`docker {' '.join(args[:2])}` failed ({proc.returncode}): "
                          f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return proc


def docker_unavailable_reason() -> str | None:
    """None when a Docker daemon answers; otherwise why not, with the fix."""
    try:
        proc = docker("version", "--format", "{{.Server.Version}}", timeout=20, check=False)
    except DockerError as exc:
        return str(exc)
    if proc.returncode != 0 or not proc.stdout.strip():
        return (f"the Docker daemon does not answer ({(proc.stderr or proc.stdout).strip()[:300]}): start it "
                "(e.g. .ci/docker-setup.sh, or `dockerd &`) or use --runner local")
    return None


def require_docker() -> None:
    reason = docker_unavailable_reason()
    if reason:
        raise DockerError(reason)


@lru_cache(maxsize=1)
def _buildx_available() -> bool:
    return docker("buildx", "version", timeout=20, check=False).returncode == 0


def build_env() -> dict[str, str]:
    """Environment for ``docker build``: the legacy builder when the buildx plug-in is missing."""
    return {} if _buildx_available() else {"DOCKER_BUILDKIT": "0"}


@dataclass(frozen=True)
class ImageInfo:
    """A local image and what its labels say about running Python in it."""

    ref: str
    id: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def python_env(self) -> str:
        return self.labels.get("org.mmdd.python-env", "image")

    @property
    def python_bin(self) -> str:
        return self.labels.get("org.mmdd.python-bin", "python")

    @property
    def python_version(self) -> str | None:
        return self.labels.get("org.mmdd.python")


def inspect_image(ref: str) -> ImageInfo | None:
    """The local image ``ref``, or None when it is not present."""
    proc = docker("image", "inspect", "--format", "{{json .}}", ref, check=False)
    if proc.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(proc.stdout)
    labels = (doc.get("Config") or {}).get("Labels") or {}
    return ImageInfo(ref=ref, id=doc["Id"], labels=dict(labels))


def require_image(ref: str, hint: str) -> ImageInfo:
    info = inspect_image(ref)
    if info is None:
        raise DockerError(f"docker image {ref!r} is not on this machine: {hint}")
    return info


def context_digest(context: Path, dockerfile: Path, base_id: str) -> str:
    """Hash of a build context (file names and contents), the Dockerfile and the base image id."""
    h = hashlib.sha256(base_id.encode())
    h.update(dockerfile.read_bytes())
    for root, dirs, files in os.walk(context):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            path = Path(root) / name
            if path.is_file():
                h.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def entry_dockerfile(cls: type) -> Path | None:
    """The Dockerfile an entry brings (``dockerfile`` class attribute, relative to the file defining the class)."""
    rel = getattr(cls, "dockerfile", None)
    if not rel:
        return None
    import inspect

    path = (Path(inspect.getfile(cls)).parent / rel).resolve()
    if not path.is_file():
        raise DockerError(f"method {cls.name!r} names dockerfile {rel!r}, but {path} does not exist: fix the "
                          "'dockerfile' class attribute (a path relative to the method's module)")
    return path


def build_entry_image(name: str, dockerfile: Path, base: ImageInfo, timeout: float = 1800) -> ImageInfo:
    """Build (or reuse) an entry's image ``FROM`` the suite image; the tag carries the suite version and a hash of
    the build context, so an unchanged entry is never rebuilt."""
    context = dockerfile.parent
    digest = context_digest(context, dockerfile, base.id)[:12]
    tag = f"{ENTRY_REPO}-{re.sub(r'[^a-z0-9_.-]', '-', name.lower())}:{__version__}-{digest}"
    info = inspect_image(tag)
    if info is not None:
        log.debug("entry image %s is up to date", tag)
        return info
    log.info("building entry image %s from %s (base %s)", tag, dockerfile, base.ref)
    proc = docker("build", "--network", "host", "-f", str(dockerfile), "--build-arg", f"BASE_IMAGE={base.ref}",
                  "--label", f"org.mmdd.entry={name}", "-t", tag, str(context), timeout=timeout, check=False,
                  env=build_env())
    if proc.returncode != 0:
        raise DockerError(f"building the image of method {name!r} from {dockerfile} failed: "
                          f"{(proc.stderr or proc.stdout).strip()[-3000:]}")
    return require_image(tag, "the build reported success but left no image")
