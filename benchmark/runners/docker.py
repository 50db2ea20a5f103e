"""Container runner: one grid cell's method runs in a Docker container, isolated from the evaluation.

The sandbox (one :class:`ContainerSpec`, shared by the method run and :meth:`DockerRunner.probe`):

- the dataset's raw data, caption features, expert and shortcut trajectories mounted **read-only** at ``/data``;
- only the cell's work directory (``<cell>/.container``) writable, at ``/out``; the image's root file system is
  read-only and ``/tmp`` an ephemeral tmpfs;
- ``--network none``, all capabilities dropped, ``no-new-privileges``; the caller's uid:gid, so outputs are theirs;
- GPUs passed when the machine has them (``MMDD_DOCKER_GPUS``);
- the configuration travels as a read-only YAML file, so the container resolves exactly the host's parameters.

The container only runs ``mmdd run-method``; the harness loads its raw DistilledSet (safetensors + JSON, no pickle),
then :meth:`benchmark.pipeline.Bench.distill` validates and records it, and evaluation trains fresh students on it.
Settings come from the environment: ``MMDD_DOCKER_IMAGE`` (default ``mmdd-bench:<version>-gpu``),
``MMDD_DOCKER_GPUS`` (``auto`` | ``none`` | a ``--gpus`` value), ``MMDD_DOCKER_TIMEOUT`` (seconds) and
``MMDD_DOCKER_ARGS`` (extra ``docker run`` arguments, e.g. ``--memory 32g``).
"""

from __future__ import annotations

import collections
import importlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from benchmark.distilled import DistilledSet
from benchmark.registry import get_method
from benchmark.runners.images import (
    DockerError,
    ImageInfo,
    build_entry_image,
    docker,
    docker_cli,
    entry_dockerfile,
    inspect_image,
    require_docker,
    require_image,
    suite_image,
)

if TYPE_CHECKING:
    from benchmark.pipeline import Bench

log = logging.getLogger(__name__)

WORK_DIR_NAME = ".container"
DATA = Path("/data")
OUT = "/out"
CONFIG = "/mmdd/config.yaml"
HOST_SITE = "/opt/mmdd/host-site"
ENTRIES = "/opt/mmdd/entries"
SUITE_PACKAGES = ("benchmark", "methods")
RAW_OUTPUTS = ("distilled.safetensors", "distilled.json")


@dataclass(frozen=True)
class Mount:
    source: Path
    target: str
    read_only: bool = True

    def arg(self) -> str:
        src = str(self.source)
        if "," in src or "," in self.target:
            raise DockerError(f"cannot bind-mount {src!r}: Docker mount paths may not contain commas; move it")
        return f"type=bind,source={src},target={self.target}" + (",readonly" if self.read_only else "")


@dataclass
class ContainerSpec:
    """Everything ``docker run`` needs, except the command."""

    image: ImageInfo
    mounts: list[Mount]
    env: dict[str, str] = field(default_factory=dict)
    gpu_args: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def run_args(self, name: str, argv: list[str]) -> list[str]:
        """``docker run`` arguments executing the image's Python interpreter with ``argv``."""
        args = ["run", "--rm", "--name", name, "--network", "none", "--read-only",
                "--tmpfs", "/tmp:rw,nosuid,nodev,exec", "--shm-size", "1g",
                "--user", f"{os.getuid()}:{os.getgid()}", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--workdir", OUT, "--entrypoint", self.image.python_bin]
        for m in self.mounts:
            args += ["--mount", m.arg()]
        for k, v in sorted(self.env.items()):
            args += ["--env", f"{k}={v}"]
        return [*args, *self.gpu_args, *self.extra_args, self.image.ref, *argv]


def config_document(bench: Bench) -> dict[str, Any]:
    """The live configuration as a plain mapping that :func:`benchmark.config.config_from_dict` accepts; the
    student's tower config is resolved so the container needs no host file. Raises if it does not round-trip."""
    from benchmark.config import config_from_dict

    def plain(cfg) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(cfg):
            if f.name == "raw" or not f.init:
                continue
            v = getattr(cfg, f.name)
            out[f.name] = {k.name: getattr(v, k.name) for k in fields(v) if k.init} if is_dataclass(v) else v
        return json.loads(json.dumps(out, default=lambda o: asdict(o) if is_dataclass(o) else str(o)))

    doc = plain(bench.cfg)
    doc["student"]["tower_config"] = dict(bench.student.tower_config)
    again = plain(config_from_dict(yaml.safe_load(config_text(doc))))
    if json.dumps(again, sort_keys=True) != json.dumps(doc, sort_keys=True):
        diff = sorted(k for k in doc if json.dumps(doc[k]) != json.dumps(again.get(k)))
        raise DockerError(f"the configuration does not survive serialisation (sections {diff}); the container "
                          "could not reproduce it: use --runner local")
    return doc


def config_text(doc: dict[str, Any]) -> str:
    """The YAML file handed to the container (``mmdd run-method --preset <file>``)."""
    return yaml.safe_dump(doc, sort_keys=True)


def _module_root(module_name: str) -> Path:
    """The file (single-module) or directory (package) of a top-level module."""
    mod = importlib.import_module(module_name.split(".")[0])
    if getattr(mod, "__file__", None):
        path = Path(mod.__file__)
        return path.parent if path.name == "__init__.py" else path
    return Path(list(mod.__path__)[0])  # namespace package


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def host_site_packages() -> Path:
    """The site-packages directory of this (virtual) environment."""
    if sys.prefix == sys.base_prefix:
        raise DockerError("a host-environment image needs the suite installed in a virtual environment (e.g. "
                          "`make install`); or use the suite image built by `containers/build.sh gpu`")
    return Path(sysconfig.get_paths()["purelib"])


def host_gpus_present() -> bool:
    return Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia/gpus").is_dir()


def docker_gpu_support() -> bool:
    proc = docker("info", "--format", "{{json .Runtimes}}", check=False, timeout=20)
    return proc.returncode == 0 and "nvidia" in proc.stdout


@dataclass
class DockerRunner:
    """Runs a method with ``mmdd run-method`` in a container; returns its raw DistilledSet (see module doc)."""

    image: str = field(default_factory=suite_image)
    gpus: str = "auto"
    timeout: float | None = None
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> DockerRunner:
        timeout = os.environ.get("MMDD_DOCKER_TIMEOUT")
        return cls(image=os.environ.get("MMDD_DOCKER_IMAGE") or suite_image(),
                   gpus=os.environ.get("MMDD_DOCKER_GPUS", "auto"),
                   timeout=float(timeout) if timeout else None,
                   extra_args=shlex.split(os.environ.get("MMDD_DOCKER_ARGS", "")))

    # ------------------------------------------------------------------ image
    def base_image(self) -> ImageInfo:
        return require_image(self.image, "build it with `containers/build.sh gpu` (GPU) or `containers/build.sh "
                                         "cpu-test` (CPU test image), or set MMDD_DOCKER_IMAGE to an image you have")

    def image_for(self, method_cls: type) -> ImageInfo:
        """The entry's own image (``container_image`` attribute, or built from its ``dockerfile``), else the
        suite image."""
        own = getattr(method_cls, "container_image", None)
        if own:
            return inspect_image(own) or self._pull(own)
        dockerfile = entry_dockerfile(method_cls)
        if dockerfile is not None:
            return build_entry_image(method_cls.name, dockerfile, self.base_image())
        return self.base_image()

    @staticmethod
    def _pull(ref: str) -> ImageInfo:
        log.info("pulling %s", ref)
        docker("pull", ref, timeout=3600)
        return require_image(ref, "`docker pull` left no image")

    # ------------------------------------------------------------------ sandbox
    def _gpu_args(self, device_type: str) -> list[str]:
        if self.gpus not in ("auto", "none"):
            return ["--gpus", self.gpus]
        have = self.gpus == "auto" and host_gpus_present() and docker_gpu_support()
        if device_type == "cuda" and not have:
            raise DockerError("device cuda needs GPUs inside the container: install the NVIDIA Container Toolkit "
                              "and restart dockerd (or set MMDD_DOCKER_GPUS), or run with --device cpu")
        return ["--gpus", "all"] if have else []

    def _python_mounts(self, method_cls: type, image: ImageInfo) -> tuple[list[Mount], list[str]]:
        """Mounts making the suite (host-env images) and an out-of-tree entry importable; ``--register`` args."""
        mounts: list[Mount] = []
        site: Path | None = None
        if image.python_env == "host":
            want = f"{sys.version_info.major}.{sys.version_info.minor}"
            if image.python_version and image.python_version != want:
                raise DockerError(f"image {image.ref} runs Python {image.python_version} but this environment is "
                                  f"{want}: rebuild it with `containers/build.sh cpu-test --python {want}`")
            site = host_site_packages()
            mounts.append(Mount(site, HOST_SITE))
            for pkg in SUITE_PACKAGES:  # editable installs point outside site-packages
                root = _module_root(pkg)
                if not _under(root, site):
                    mounts.append(Mount(root.resolve(), str(root.resolve())))
        top = method_cls.__module__.split(".")[0]
        if top in SUITE_PACKAGES:
            return mounts, []
        if top == "__main__":
            raise DockerError(f"method {method_cls.name!r} is defined in __main__: move it into a module so a "
                              "container can import it")
        register = ["--register", f"{method_cls.name}={method_cls.__module__}:{method_cls.__qualname__}"]
        own_image = getattr(method_cls, "container_image", None) or getattr(method_cls, "dockerfile", None)
        root = _module_root(top)
        if not own_image and not (site is not None and _under(root, site)):
            mounts.append(Mount(root.resolve(), f"{ENTRIES}/{root.name}"))
        return mounts, register

    def _data_mounts(self, bench: Bench, ds: str) -> list[Mount]:
        """Read-only mounts of the dataset's part of every stage under data/ (``data/<stage>/<ds>``: raw images and
        annotations, caption features, expert and shortcut trajectories)."""
        root = bench.layout.data_root
        stages = sorted(p.name for p in root.iterdir() if (p / ds).is_dir()) if root.is_dir() else []
        if not stages:
            raise FileNotFoundError(f"no data of {ds!r} under {root}: run `mmdd fetch` and `mmdd embed` first")
        return [Mount((root / st / ds).resolve(), str(DATA / st / ds)) for st in stages]

    def spec(self, bench: Bench, ds: str, method_cls: type, work_dir: Path, config_file: Path,
             image: ImageInfo | None = None) -> tuple[ContainerSpec, list[str]]:
        """The sandbox of one cell (and the ``--register`` arguments for an out-of-tree entry)."""
        image = image or self.image_for(method_cls)
        py_mounts, register = self._python_mounts(method_cls, image)
        mounts = [*self._data_mounts(bench, ds), Mount(config_file, CONFIG), *py_mounts,
                  Mount(work_dir.resolve(), OUT, read_only=False)]
        env = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "MPLCONFIGDIR": "/tmp",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        if any(m.target.startswith(ENTRIES) for m in mounts):
            env["PYTHONPATH"] = ENTRIES
        for var, target in (("HF_HOME", "/cache/huggingface"), ("TORCH_HOME", "/cache/torch")):
            default = Path.home() / ".cache" / target.rsplit("/", 1)[1]
            src = Path(os.environ.get(var) or default)
            if src.is_dir():  # model weights: read-only, the container cannot download
                mounts.append(Mount(src.resolve(), target))
                env[var] = target
        spec = ContainerSpec(image=image, mounts=mounts, env=env, gpu_args=self._gpu_args(bench.device.type),
                             extra_args=list(self.extra_args))
        return spec, register

    # ------------------------------------------------------------------ running
    def _run(self, spec: ContainerSpec, name: str, argv: list[str], label: str) -> tuple[int, list[str]]:
        """Run the container, streaming its output to the log; return (exit code, last lines)."""
        cmd = [docker_cli(), *spec.run_args(name, argv)]
        log.debug("docker command: %s", shlex.join(cmd))
        tail: collections.deque[str] = collections.deque(maxlen=40)
        timed_out = threading.Event()

        def on_timeout() -> None:
            timed_out.set()
            self._kill(name)

        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        timer = threading.Timer(self.timeout, on_timeout) if self.timeout else None
        if timer:
            timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip())
                log.info("[%s] %s", label, line.rstrip())
            rc = proc.wait()
        except BaseException:  # interrupted: never leave the container running
            self._kill(name)
            proc.kill()
            raise
        finally:
            if timer:
                timer.cancel()
        if timed_out.is_set():
            tail.append(f"(killed after MMDD_DOCKER_TIMEOUT={self.timeout:g} s)")
        return rc, list(tail)

    @staticmethod
    def _kill(name: str) -> None:
        docker("rm", "-f", name, check=False, timeout=60)

    def __call__(self, bench: Bench, ds: str, method: str, budget: int, seed: int,
                 cell_dir: Path) -> DistilledSet:
        require_docker()
        cls = get_method(method)
        work = Path(cell_dir) / WORK_DIR_NAME
        work.mkdir(parents=True, exist_ok=True)
        for stale in (*RAW_OUTPUTS, "distill_log.jsonl"):  # keep checkpoint/ for resume
            (work / stale).unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="mmdd-docker-") as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(config_text(config_document(bench)))
            spec, register = self.spec(bench, ds, cls, work, config)
            argv = ["-m", "benchmark.runners.inside", *register, "--", "run-method", "--preset", CONFIG,
                    "--dataset", ds, "--data-root", str(DATA), "--results-root", "/tmp/results",
                    "--method", method, "--budget", str(budget), "--seed", str(seed), "--work-dir", OUT,
                    "--device", str(bench.device), "--no-progress"]
            log.info("running %s (b=%d, s=%d) in container %s", method, budget, seed, spec.image.ref)
            rc, tail = self._run(spec, _container_name(method, ds, budget, seed), argv, method)
        if rc != 0:
            _remove(work, RAW_OUTPUTS)
            detail = "\n  ".join(tail[-15:])
            raise DockerError(f"method {method!r} failed in container {spec.image.ref} (exit {rc}); its checkpoint "
                              f"(if any) stays in {work} for resume. Last output:\n  {detail}")
        try:
            dset = DistilledSet.load(work / "distilled")
        except BaseException:
            _remove(work, RAW_OUTPUTS)
            raise
        if (work / "distill_log.jsonl").exists():
            os.replace(work / "distill_log.jsonl", Path(cell_dir) / "distill_log.jsonl")
        shutil.rmtree(work)
        dset.meta["container_image"] = spec.image.ref
        dset.meta["container_image_id"] = spec.image.id
        return dset

    def probe(self, bench: Bench, ds: str, method: str, script: str, work_dir: Path) -> tuple[int, list[str]]:
        """Run a Python ``script`` in exactly the sandbox ``method`` would get (for tests and ``check-entry``)."""
        require_docker()
        cls = get_method(method)
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mmdd-docker-") as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(config_text(config_document(bench)))
            spec, _ = self.spec(bench, ds, cls, work_dir, config)
            return self._run(spec, _container_name("probe", ds, 0, 0), ["-c", script], "probe")


def _container_name(method: str, ds: str, budget: int, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in f"{method}-{ds}")
    return f"mmdd-{safe}-b{budget}-s{seed}-{uuid.uuid4().hex[:8]}"


def _remove(directory: Path, names: tuple[str, ...]) -> None:
    for name in names:
        (directory / name).unlink(missing_ok=True)
