"""``python -m benchmark.worker``: a long-lived process that runs ``mmdd`` stage commands in-process for the sweep's
local executor (:mod:`benchmark.sweep.workers`), so torch, torchvision and MLflow are imported once per worker
instead of once per stage.

Protocol: one JSON request per line on stdin (``argv``, ``cwd``, ``log``, ``env``), one JSON reply per line on the
worker's original stdout, kept on a private file descriptor. While a task runs, file descriptors 1 and 2 point at the
task's log and a :class:`logging.FileHandler` on the root logger writes there too, so the log holds what the same
command writes as a subprocess. Every task starts from the same process state: working directory, environment,
``sys.argv``, torch threads, grad mode, default dtype, warning filters, root logger and a fresh-process RNG state are
restored after each task.

This module lives outside :mod:`benchmark.sweep` because it calls :func:`benchmark.cli.main`, a layer above the
sweep (the import contracts in ``pyproject.toml``); the sweep only starts it as a program.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

import benchmark.cli

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as `mmdd` logs (benchmark.cli._setup_logging)
LOG_DATEFMT = "%H:%M:%S"


@dataclass(frozen=True)
class Request:
    """One command to run: ``mmdd`` arguments (without the program name), its directory, log and extra env."""

    argv: list[str]
    cwd: str
    log: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, line: str) -> Request:
        doc = json.loads(line)
        if not isinstance(doc.get("argv"), list) or not all(isinstance(a, str) for a in doc["argv"]):
            raise ValueError(f"request field 'argv' must be a list of strings, got {doc.get('argv')!r}")
        for key in ("cwd", "log"):
            if not isinstance(doc.get(key), str) or not doc[key]:
                raise ValueError(f"request field {key!r} must be a non-empty path, got {doc.get(key)!r}")
        env = doc.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("request field 'env' must map strings to strings")
        return cls(doc["argv"], doc["cwd"], doc["log"], env)


@dataclass
class ProcessState:
    """The process-wide state a stage command may change, captured before it runs and put back afterwards."""

    cwd: str
    environ: dict[str, str]
    argv: list[str]
    threads: int
    grad: bool
    dtype: torch.dtype
    filters: list
    root_level: int
    root_handlers: list[logging.Handler]

    @classmethod
    def capture(cls) -> ProcessState:
        root = logging.getLogger()
        return cls(os.getcwd(), dict(os.environ), list(sys.argv), torch.get_num_threads(), torch.is_grad_enabled(),
                   torch.get_default_dtype(), list(warnings.filters), root.level, list(root.handlers))

    def restore(self) -> None:
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)
        sys.argv[:] = self.argv
        torch.set_num_threads(self.threads)
        torch.set_grad_enabled(self.grad)
        torch.set_default_dtype(self.dtype)
        warnings.filters[:] = self.filters
        root = logging.getLogger()
        for h in [h for h in root.handlers if h not in self.root_handlers]:
            h.close()
        root.handlers[:] = self.root_handlers  # also undoes a basicConfig(force=True) inside the task
        root.setLevel(self.root_level)


def fresh_rng(torch_seed: int) -> None:
    """The random state of a newly started process: torch's default seed, OS entropy for ``random`` and numpy."""
    torch.manual_seed(torch_seed)
    random.seed()
    np.random.seed()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _point_std_fds(fd: int) -> None:
    """Send file descriptors 1 and 2 (and so ``sys.stdout``, ``sys.stderr`` and C-level writes) to ``fd``."""
    _flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 1


def run_command(argv: list[str]) -> int:
    """``mmdd ARGV`` in this process, with a subprocess's exit codes: SystemExit's code, 1 for an uncaught error."""
    sys.argv[:] = ["mmdd", *argv]
    try:
        return int(benchmark.cli.main(argv))
    except SystemExit as exc:  # argparse errors, sys.exit() inside a stage
        return _exit_code(exc)
    except Exception:  # noqa: BLE001 - what the interpreter prints for an uncaught error, then exit status 1
        traceback.print_exc()
        return 1


def run_request(req: Request, idle_fd: int) -> dict[str, float | int]:
    """Run one request with its output in its log; returns the reply (exit code, seconds, CPU seconds, peak RSS)."""
    saved = ProcessState.capture()
    t0, cpu0 = time.perf_counter(), time.process_time()
    log_fd = os.open(req.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    handler = logging.FileHandler(req.log, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    try:
        os.environ.update(req.env)
        os.chdir(req.cwd)
        _point_std_fds(log_fd)
        root = logging.getLogger()
        root.addHandler(handler)  # `mmdd`'s basicConfig then leaves the root logger alone
        root.setLevel(logging.DEBUG if {"-v", "--verbose"} & set(req.argv) else logging.INFO)
        rc = run_command(req.argv)
    finally:
        _point_std_fds(idle_fd)
        os.close(log_fd)
        saved.restore()
    return {"rc": rc, "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _reply(fd: int, doc: dict) -> None:
    os.write(fd, (json.dumps(doc) + "\n").encode())


def serve(requests, reply_fd: int, idle_fd: int, torch_seed: int) -> None:
    """Answer requests until stdin closes."""
    for line in requests:
        if not line.strip():
            continue
        try:
            req = Request.parse(line)
        except (ValueError, json.JSONDecodeError) as exc:
            _reply(reply_fd, {"error": f"bad request: {exc}"})
            continue
        fresh_rng(torch_seed)
        try:
            reply = run_request(req, idle_fd)
        except OSError as exc:  # the log or the directory is not there: the task never started
            reply = {"error": f"cannot run the task: {exc}"}
        _reply(reply_fd, reply)


def main() -> int:
    torch_seed = torch.initial_seed()  # the default seed every new process starts from
    reply_fd = os.dup(1)  # the driver reads replies here; fd 1 itself goes to each task's log
    requests = os.fdopen(os.dup(0), "r", encoding="utf-8")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)  # tasks read no input, as with stdin=DEVNULL
    idle_fd = os.dup(2)  # the worker's own log, between tasks
    _point_std_fds(idle_fd)
    benchmark.cli.build_parser()  # imports what every stage command's parser needs
    _reply(reply_fd, {"ready": True, "pid": os.getpid(), "at": time.time()})  # the driver times the start-up
    serve(requests, reply_fd, idle_fd, torch_seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
