"""Container runner: one grid cell's method runs in a Docker container, isolated from the evaluation.

The sandbox (one :class:`ContainerSpec`, shared by the method run and :meth:`DockerRunner.probe`; threat model in
docs/security.md):

- only the cell's train-only inputs (:func:`benchmark.runners.inputs.train_mounts`) mounted **read-only** under
  ``/data``: no val or test file;
- only the cell's scratch directory (``<cell>/.container``) writable, at ``/out``; the image's root file system is
  read-only and ``/tmp`` a size-limited tmpfs;
- ``--network none``, all capabilities dropped, ``no-new-privileges``; the caller's uid:gid, so outputs are theirs;
- :class:`~benchmark.runners.spec.SandboxLimits`: memory (no swap), pids, CPUs, /tmp and /dev/shm sizes, a
  per-file size limit, a wall-clock timeout and a cap on what ``/out`` may hold (checked every ``poll_s`` while the
  container runs and once after);
- labels ``mmdd.owner=mmdd-bench`` and ``mmdd.cell=<cell id>``: a rerun of the cell removes containers an earlier,
  killed run left behind; SIGINT/SIGTERM of the host process stop and remove the container, then exit 130/143;
- GPUs passed when the machine has them (``MMDD_DOCKER_GPUS``);
- the configuration travels as a read-only YAML file, so the container resolves exactly the host's parameters.

The container only runs ``mmdd run-method``; the harness copies the bytes of its raw DistilledSet out of ``/out``
(regular files only: :mod:`benchmark.runners.outputs`), then :func:`benchmark.stages.distill.distill` validates and
records it, and evaluation trains fresh students on it. Runner settings come from the environment:
``MMDD_DOCKER_IMAGE`` (default ``mmdd-bench:<version>-gpu``), ``MMDD_DOCKER_GPUS`` (``auto`` | ``none`` | a
``--gpus`` value) and ``MMDD_DOCKER_ARGS`` (extra ``docker create`` arguments, trusted: they come from the
operator); the limits' overrides are listed in :data:`benchmark.runners.spec.ENV_OVERRIDES`.
"""

from __future__ import annotations

import collections
import importlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from benchmark.distilled import DistilledSet
from benchmark.interface import CHECKPOINT_DIR, Checkpointer
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
from benchmark.runners.inputs import CONTAINER_DATA
from benchmark.runners.outputs import collect_set, usage
from benchmark.runners.spec import CellSpec, SandboxLimits, config_text

log = logging.getLogger(__name__)

WORK_DIR_NAME = ".container"
OUT = "/out"
CONFIG = "/mmdd/config.yaml"
HOST_SITE = "/opt/mmdd/host-site"
ENTRIES = "/opt/mmdd/entries"
SUITE_PACKAGES = ("benchmark", "methods")
RAW_OUTPUTS = ("distilled.safetensors", "distilled.json", "distill_log.jsonl")
OWNER_LABEL, OWNER = "mmdd.owner", "mmdd-bench"
CELL_LABEL = "mmdd.cell"
MAX_RELAYED_LINES = 20_000  # container output relayed to the log; later lines are only kept in the tail


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
    """Everything ``docker create`` needs, except the name and the command."""

    image: ImageInfo
    mounts: list[Mount]
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    gpu_args: list[str] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def limit_args(self) -> list[str]:
        lim = self.limits
        return ["--memory", str(lim.memory_bytes), "--memory-swap", str(lim.memory_bytes),
                "--pids-limit", str(lim.pids_limit), "--cpus", f"{lim.cpus:g}",
                "--tmpfs", f"/tmp:rw,nosuid,nodev,exec,size={lim.tmp_bytes}", "--shm-size", str(lim.shm_bytes),
                "--ulimit", f"fsize={lim.out_max_bytes}", "--ulimit", "core=0"]

    def create_args(self, name: str, argv: list[str]) -> list[str]:
        """``docker create`` arguments executing the image's Python interpreter with ``argv``."""
        args = ["create", "--name", name, "--network", "none", "--read-only", *self.limit_args(),
                "--user", f"{os.getuid()}:{os.getgid()}", "--cap-drop", "ALL",
                "--security-opt", "no-new-privileges", "--workdir", OUT, "--entrypoint", self.image.python_bin]
        for k, v in sorted(self.labels.items()):
            args += ["--label", f"{k}={v}"]
        for m in self.mounts:
            args += ["--mount", m.arg()]
        for k, v in sorted(self.env.items()):
            args += ["--env", f"{k}={v}"]
        return [*args, *self.gpu_args, *self.extra_args, self.image.ref, *argv]


@dataclass
class RunResult:
    """How a container ended: its exit code, its last lines, and why the harness stopped it (if it did)."""

    rc: int
    tail: list[str]
    stopped: str | None = None  # "timeout" | "out-size" | None
    oom_killed: bool = False
    seconds: float = 0.0

    def failure(self, limits: SandboxLimits) -> str | None:
        """Why the run failed, naming the limit; None when it succeeded."""
        if self.stopped == "timeout":
            return f"rule 'timeout': killed after {limits.timeout_s:g} s (sandbox.timeout_s, MMDD_DOCKER_TIMEOUT)"
        if self.stopped == "out-size":
            return (f"rule 'out-size': its output directory passed {limits.out_max_bytes} bytes or "
                    f"{limits.out_max_files} entries (sandbox.out_max_bytes / out_max_files, MMDD_DOCKER_OUT_MAX)")
        if self.oom_killed:
            return (f"rule 'memory': killed for using more than {limits.memory_bytes} bytes of memory, /tmp and "
                    "/dev/shm included (sandbox.memory_bytes, MMDD_DOCKER_MEMORY)")
        if self.rc != 0:
            return f"exit {self.rc}"
        return None


class HostInterrupted(SystemExit):
    """SIGINT/SIGTERM reached the host process while a container ran; exits 128 + signal number quietly."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextmanager
def _interruptible() -> Iterator[None]:
    """Turn SIGINT/SIGTERM into :class:`HostInterrupted` (main thread only); a second signal is ignored so the
    cleanup it triggers is not cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired: list[int] = []

    def handler(signum, frame):
        if fired:
            log.warning("received %s again: still cleaning up", signal.Signals(signum).name)
            return
        fired.append(signum)
        raise HostInterrupted(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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


def data_mounts(spec: CellSpec) -> list[Mount]:
    """The cell's train-only inputs, read-only; every target must lie under ``/data``."""
    if not spec.mounts:
        raise DockerError(f"cell {spec.cell_id} names no input mounts: build them with "
                          "benchmark.runners.inputs.train_mounts")
    out = []
    for host, target in spec.mounts:
        t = PurePosixPath(target)
        if not t.is_absolute() or ".." in t.parts or not t.is_relative_to(CONTAINER_DATA) or t == CONTAINER_DATA:
            raise ValueError(f"input mount target {target!r} must be a path below {CONTAINER_DATA}")
        if not Path(host).exists():
            raise FileNotFoundError(f"input {host} of cell {spec.cell_id} does not exist")
        out.append(Mount(Path(host).resolve(), str(t)))
    return out


def orphans(cell_id: str) -> list[str]:
    """Ids of the containers (running or not) an earlier run of this cell left behind."""
    proc = docker("ps", "-aq", "--filter", f"label={OWNER_LABEL}={OWNER}", "--filter", f"label={CELL_LABEL}={cell_id}",
                  timeout=60)
    return proc.stdout.split()


def reap(cell_id: str) -> int:
    """Remove the containers of an earlier run of this cell (its host process was killed); return how many."""
    ids = orphans(cell_id)
    if ids:
        docker("rm", "-f", *ids, check=False, timeout=120)
        log.warning("removed %d container(s) an earlier run of %s left behind", len(ids), cell_id)
    return len(ids)


@dataclass
class DockerRunner:
    """Runs a method with ``mmdd run-method`` in a container; returns its raw DistilledSet (see module doc)."""

    image: str = field(default_factory=suite_image)
    gpus: str = "auto"
    extra_args: list[str] = field(default_factory=list)

    @classmethod
    def from_env(cls) -> DockerRunner:
        return cls(image=os.environ.get("MMDD_DOCKER_IMAGE") or suite_image(),
                   gpus=os.environ.get("MMDD_DOCKER_GPUS", "auto"),
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

    def _python_mounts(self, method_cls: type, image: ImageInfo) -> tuple[list[Mount], list[str], list[str]]:
        """Mounts making the suite (host-env images) and an out-of-tree entry importable; the container's
        PYTHONPATH (so it imports the very source the host runs); ``--register`` args."""
        mounts: list[Mount] = []
        pythonpath: list[str] = []
        site: Path | None = None
        if image.python_env == "host":
            want = f"{sys.version_info.major}.{sys.version_info.minor}"
            if image.python_version and image.python_version != want:
                raise DockerError(f"image {image.ref} runs Python {image.python_version} but this environment is "
                                  f"{want}: rebuild it with `containers/build.sh cpu-test --python {want}`")
            site = host_site_packages()
            mounts.append(Mount(site, HOST_SITE))
            for pkg in SUITE_PACKAGES:  # editable installs and source checkouts live outside site-packages
                root = _module_root(pkg).resolve()
                if not _under(root, site):
                    mounts.append(Mount(root, str(root)))
                    if str(root.parent) not in pythonpath:
                        pythonpath.append(str(root.parent))
        top = method_cls.__module__.split(".")[0]
        if top in SUITE_PACKAGES:
            return mounts, pythonpath, []
        if top == "__main__":
            raise DockerError(f"method {method_cls.name!r} is defined in __main__: move it into a module so a "
                              "container can import it")
        register = ["--register", f"{method_cls.name}={method_cls.__module__}:{method_cls.__qualname__}"]
        own_image = getattr(method_cls, "container_image", None) or getattr(method_cls, "dockerfile", None)
        root = _module_root(top)
        if not own_image and not (site is not None and _under(root, site)):
            mounts.append(Mount(root.resolve(), f"{ENTRIES}/{root.name}"))
            pythonpath.append(ENTRIES)
        return mounts, pythonpath, register

    def container_spec(self, spec: CellSpec, method_cls: type, out_dir: Path, config_file: Path,
                       image: ImageInfo | None = None) -> tuple[ContainerSpec, list[str]]:
        """The sandbox of one cell (and the ``--register`` arguments for an out-of-tree entry)."""
        image = image or self.image_for(method_cls)
        py_mounts, pythonpath, register = self._python_mounts(method_cls, image)
        mounts = [*data_mounts(spec), Mount(config_file, CONFIG), *py_mounts,
                  Mount(out_dir.resolve(), OUT, read_only=False)]
        env = {"HOME": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "MPLCONFIGDIR": "/tmp",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
        if pythonpath:
            env["PYTHONPATH"] = ":".join(pythonpath)
        for var, target in (("HF_HOME", "/cache/huggingface"), ("TORCH_HOME", "/cache/torch")):
            default = Path.home() / ".cache" / target.rsplit("/", 1)[1]
            src = Path(os.environ.get(var) or default)
            if src.is_dir():  # model weights: read-only, the container cannot download
                mounts.append(Mount(src.resolve(), target))
                env[var] = target
        labels = {OWNER_LABEL: OWNER, CELL_LABEL: spec.cell_id}
        cspec = ContainerSpec(image=image, mounts=mounts, limits=spec.limits, labels=labels, env=env,
                              gpu_args=self._gpu_args(spec.device.split(":")[0]), extra_args=list(self.extra_args))
        return cspec, register

    # ------------------------------------------------------------------ running
    def _run(self, cspec: ContainerSpec, name: str, argv: list[str], label: str, out_dir: Path) -> RunResult:
        """Create and run the container, relaying its output to the log, within its limits; always remove it."""
        log.debug("container %s: docker %s", name, shlex.join(cspec.create_args(name, argv)))
        result = RunResult(rc=-1, tail=[])
        t0 = time.monotonic()
        with _interruptible():  # cleanup runs inside: a second signal cannot cut it short
            try:
                docker(*cspec.create_args(name, argv), timeout=300)
                proc = subprocess.Popen([docker_cli(), "start", "--attach", name], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, errors="replace")
                try:
                    with _Watchdog(name, cspec.limits, out_dir, result):
                        result.tail = _relay(proc, label)
                        result.rc = proc.wait()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
            except HostInterrupted as exc:
                _remove_container(name)
                log.error("interrupted by %s: container %s stopped and removed", signal.Signals(exc.signum).name,
                          name)
                raise
            except BaseException:
                _remove_container(name)
                raise
        result.seconds = time.monotonic() - t0
        state = docker("inspect", "--format", "{{.State.OOMKilled}}", name, check=False, timeout=60)
        result.oom_killed = state.stdout.strip() == "true"
        _remove_container(name)
        why = result.failure(cspec.limits)
        if why and why != f"exit {result.rc}":
            result.tail.append(f"(stopped: {why})")
        return result

    def __call__(self, spec: CellSpec) -> DistilledSet:
        require_docker()
        cls = get_method(spec.method)
        work = Path(spec.work_dir) / WORK_DIR_NAME
        work.mkdir(parents=True, exist_ok=True)
        _clear(work, outputs_to_clear(work))  # keep checkpoint/ for resume
        reap(spec.cell_id)
        with tempfile.TemporaryDirectory(prefix="mmdd-docker-") as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(config_text(spec.config_doc))
            cspec, register = self.container_spec(spec, cls, work, config)
            argv = ["-m", "benchmark.method_entry", *register, "--", "run-method", "--params", CONFIG,
                    "--dataset", spec.dataset, "--data-root", str(CONTAINER_DATA), "--results-root", "/tmp/results",
                    "--method", spec.method, "--budget", str(spec.budget), "--seed", str(spec.seed),
                    "--work-dir", OUT, "--device", spec.device, "--no-progress"]
            log.info("running %s (b=%d, s=%d) in container %s", spec.method, spec.budget, spec.seed, cspec.image.ref)
            res = self._run(cspec, _container_name(spec.method, spec.dataset, spec.budget, spec.seed), argv,
                            spec.method, work)
        over = _over_cap(work, spec.limits)
        why = res.failure(spec.limits) or over
        if why:
            if over or res.stopped == "out-size":  # nothing in it is worth keeping, checkpoints included
                shutil.rmtree(work, ignore_errors=True)
                kept = f"{work} was deleted"
            else:
                _clear(work, RAW_OUTPUTS)
                kept = f"its checkpoint (if any) stays in {work} for resume"
            detail = "\n  ".join(res.tail[-15:])
            raise DockerError(f"method {spec.method!r} failed in container {cspec.image.ref} ({why}); {kept}. "
                              f"Last output:\n  {detail}")
        try:
            dset = collect_set(work, Path(spec.work_dir) / "distill_log.jsonl", spec.limits.out_max_bytes)
        except BaseException:
            _clear(work, RAW_OUTPUTS)
            raise
        shutil.rmtree(work)
        dset.meta["container_image"] = cspec.image.ref
        dset.meta["container_image_id"] = cspec.image.id
        dset.meta["container_seconds"] = res.seconds  # measured by the host; meta["seconds"] is the method's own
        return dset

    def probe(self, spec: CellSpec, script: str, out_dir: Path) -> RunResult:
        """Run a Python ``script`` in exactly the sandbox ``spec.method`` would get (for tests and
        ``check-entry``), with the same limits and labels."""
        require_docker()
        cls = get_method(spec.method)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="mmdd-docker-") as tmp:
            config = Path(tmp) / "config.yaml"
            config.write_text(config_text(spec.config_doc))
            cspec, _ = self.container_spec(spec, cls, out_dir, config)
            return self._run(cspec, _container_name("probe", spec.dataset, 0, 0), ["-c", script], "probe", out_dir)


class _Watchdog:
    """While the container runs: kill it at the deadline or once its output directory passes the caps."""

    def __init__(self, name: str, limits: SandboxLimits, out_dir: Path, result: RunResult):
        self.name, self.limits, self.out_dir, self.result = name, limits, out_dir, result
        self.deadline = time.monotonic() + limits.timeout_s
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"watchdog-{name}", daemon=True)

    def __enter__(self) -> _Watchdog:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self.done.wait(min(self.limits.poll_s, max(0.0, self.deadline - time.monotonic()))):
            if time.monotonic() >= self.deadline:
                self._stop("timeout")
            elif _over_cap(self.out_dir, self.limits):
                self._stop("out-size")
            if self.result.stopped:
                return

    def _stop(self, why: str) -> None:
        self.result.stopped = why
        log.warning("stopping container %s: %s", self.name, why)
        docker("kill", self.name, check=False, timeout=60)


def _relay(proc: subprocess.Popen, label: str) -> list[str]:
    """Log the container's output lines (the first MAX_RELAYED_LINES, each cut to 2000 characters); return the
    last 40."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    assert proc.stdout is not None
    for n, line in enumerate(proc.stdout):
        line = line.rstrip()[:2000]
        tail.append(line)
        if n < MAX_RELAYED_LINES:
            log.info("[%s] %s", label, line)
        elif n == MAX_RELAYED_LINES:
            log.warning("[%s] more than %d lines of output: relaying only the last ones", label, n)
    return list(tail)


def _over_cap(out_dir: Path, limits: SandboxLimits) -> str | None:
    u = usage(out_dir, limits.out_max_files)
    if u.bytes > limits.out_max_bytes or u.entries > limits.out_max_files:
        return (f"rule 'out-size': its output directory holds {u.bytes} bytes in {u.entries} entries, over the caps "
                f"of {limits.out_max_bytes} bytes / {limits.out_max_files} entries (sandbox.out_max_bytes, "
                "out_max_files)")
    return None


def _remove_container(name: str) -> None:
    docker("rm", "-f", name, check=False, timeout=120)


def _container_name(method: str, ds: str, budget: int, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "_.-" else "-" for c in f"{method}-{ds}")
    return f"mmdd-{safe}-b{budget}-s{seed}-{uuid.uuid4().hex[:8]}"


def outputs_to_clear(work: Path) -> tuple[str, ...]:
    """The raw outputs to remove before a run in ``work``: all of them, except the log when a checkpoint will resume
    the run (the method then truncates its log to the checkpoint's iteration, keeping the records before it)."""
    if Checkpointer(work / CHECKPOINT_DIR).exists():
        return tuple(n for n in RAW_OUTPUTS if n != "distill_log.jsonl")
    return RAW_OUTPUTS


def _clear(directory: Path, names: tuple[str, ...]) -> None:
    """Remove these entries (whatever they are; links are removed, never followed)."""
    for name in names:
        path = directory / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
