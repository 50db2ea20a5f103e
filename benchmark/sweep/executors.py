"""Where tasks run: worker threads on this machine (``local``) or Ray tasks on a cluster (``ray``).

Both run :func:`benchmark.sweep.cell.run_task`; the driver (:mod:`benchmark.sweep.runner`) owns ordering, retries
and DVC. An executor only submits one attempt and reports how it ended, including a worker or node that died.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
from pathlib import Path
from typing import Any, Protocol

from benchmark.sweep.cell import Result, run_task, task_process_env
from benchmark.sweep.stages import SweepError, Task
from benchmark.sweep.workers import WorkerPool, mmdd_argv

TASK_MODES = ("worker", "subprocess")

log = logging.getLogger(__name__)


class Executor(Protocol):
    description: str

    def submit(self, task: Task, attempt: int) -> None: ...

    def wait(self, timeout: float) -> list[Result]:
        """Results of attempts that finished (waits up to ``timeout`` seconds for the first one)."""
        ...

    def in_flight(self) -> int: ...

    def warm(self, commands: list[str]) -> None:
        """Start what running these commands will need (worker processes) before the first one is submitted."""
        ...

    def stats(self) -> dict[str, float | int]:
        """Executor counters for the sweep summary (e.g. worker start-ups)."""
        ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


def parallel_env(jobs: int, env: dict[str, str]) -> dict[str, str]:
    """Variables for ``jobs`` processes sharing this machine's cores, except those ``env`` (what the tasks would
    inherit) already sets:

    * ``OMP_NUM_THREADS`` = cores // jobs, torch's default thread count in each;
    * ``OMP_WAIT_POLICY=PASSIVE``: a stage still sets its preset's fixed ``threads`` (bitwise results need a fixed
      count), which can exceed cores // jobs; OpenMP's default then has each process's idle threads spin on the
      cores the other jobs need. Two processes training a small ConvNet with 2 threads each on 2 cores took
      26.6-30.1 s spinning and 12.6-15.2 s passive (with 1 thread each: 12.5-13.9 s). Numerics do not change."""
    if jobs <= 1:
        return {}
    want = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs)), "OMP_WAIT_POLICY": "PASSIVE"}
    return {k: v for k, v in want.items() if k not in env}


class LocalExecutor:
    """Up to ``jobs`` tasks at once on this machine, from worker threads. ``tasks="worker"``: plain ``mmdd`` commands
    run in-process in ``jobs`` persistent worker processes (:mod:`benchmark.sweep.workers`), anything else in a
    subprocess; ``tasks="subprocess"``: every task is its own subprocess."""

    def __init__(self, root: str, env: dict[str, str], jobs: int = 1, device: str | None = None,
                 tasks: str = "worker", log_dir: str = "results/logs"):
        if jobs < 1:
            raise SweepError(f"--jobs must be at least 1, not {jobs}")
        if tasks not in TASK_MODES:
            raise SweepError(f"--tasks must be one of {', '.join(TASK_MODES)}, not {tasks!r}")
        self.root, self.env, self.device, self.jobs = root, dict(env), device, jobs
        self.env.update(parallel_env(jobs, {**os.environ, **self.env}))
        self.workers = None
        if tasks == "worker":
            self.workers = WorkerPool(jobs, task_process_env(self.env), Path(root), Path(root) / log_dir / "workers")
        self.pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mmdd-sweep")
        self.futures: dict[cf.Future, tuple[Task, int]] = {}
        self.description = f"local, {jobs} at a time, " + (
            f"{jobs} persistent worker process(es)" if self.workers else "one subprocess per task")

    def submit(self, task: Task, attempt: int) -> None:
        device = self.device if task.wants_gpu else None
        fut = self.pool.submit(run_task, task, self.root, attempt, self.env, device, "local", self.workers)
        self.futures[fut] = (task, attempt)

    def warm(self, commands: list[str]) -> None:
        if self.workers and any(mmdd_argv(c) is not None for c in commands):
            self.workers.start()

    def stats(self) -> dict[str, float | int]:
        return {"jobs": self.jobs, **(self.workers.stats() if self.workers else {})}

    def wait(self, timeout: float) -> list[Result]:
        if not self.futures:
            return []
        done, _ = cf.wait(self.futures, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        out = []
        for fut in done:
            task, attempt = self.futures.pop(fut)
            try:
                out.append(fut.result())
            except Exception as exc:  # noqa: BLE001 - reported as a failed attempt
                out.append(Result(task.id, attempt, False, 0.0, socket.gethostname(), "local", os.getpid(),
                                  error=f"{type(exc).__name__}: {exc}"))
        return out

    def in_flight(self) -> int:
        return len(self.futures)

    def cancel(self) -> None:
        for fut in self.futures:
            fut.cancel()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.workers:
            self.workers.close()


def _ray_task(task: Task, root: str, attempt: int, env: dict[str, str], device: str | None) -> Result:
    """Body of the Ray task: :func:`run_task` tagged with the Ray node it ran on."""
    import ray

    return run_task(task, root, attempt, env, device, ray.get_runtime_context().get_node_id()[:12])


class RayExecutor:
    """Each attempt is one Ray task with its resource needs; Ray places it on a node with free CPUs/GPUs.

    Ray's own retries are off (``max_retries=0``): the driver retries, so every attempt is counted and logged.
    """

    def __init__(self, root: str, env: dict[str, str], address: str | None = None, cpus_per_task: float = 1.0,
                 gpus_per_task: str | float = "auto"):
        try:
            import ray
        except ImportError as exc:
            raise SweepError("--runner ray needs Ray: pip install 'ray>=2.60,<3' (or the project's [cluster] "
                             "extra)") from exc
        self.ray = ray
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                     include_dashboard=False if address in (None, "local") else None)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SweepError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS/local'}: {exc} "
                             "(start it with `ray start --head`, see docs/cluster.md)") from exc
        resources = ray.cluster_resources()
        cluster_cpus, cluster_gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        self.gpus = (1.0 if cluster_gpus > 0 else 0.0) if gpus_per_task == "auto" else float(gpus_per_task)
        self.cpus = float(cpus_per_task)
        if self.gpus > cluster_gpus or self.cpus > cluster_cpus:  # an autoscaling cluster may still add nodes
            log.warning("each task asks for %g CPU / %g GPU but the cluster has %g CPUs / %g GPUs now: tasks wait "
                        "until such a node joins (see --cpus-per-task, --gpus-per-task)", self.cpus, self.gpus,
                        cluster_cpus, cluster_gpus)
        self.root, self.env = root, env
        self.remote = ray.remote(_ray_task)
        self.refs: dict[Any, tuple[Task, int]] = {}
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.description = (f"Ray cluster of {len(nodes)} node(s) with {cluster_cpus:g} CPUs and {cluster_gpus:g} "
                            f"GPUs; {self.cpus:g} CPU per task, {self.gpus:g} GPU per compute task")

    def submit(self, task: Task, attempt: int) -> None:
        gpus = self.gpus if task.wants_gpu else 0.0
        ref = self.remote.options(num_cpus=self.cpus, num_gpus=gpus, max_retries=0, retry_exceptions=False,
                                  name=task.id).remote(task, self.root, attempt, self.env, "cuda" if gpus else None)
        self.refs[ref] = (task, attempt)

    def wait(self, timeout: float) -> list[Result]:
        if not self.refs:
            return []
        ready, _ = self.ray.wait(list(self.refs), num_returns=1, timeout=timeout)
        if ready:  # collect everything else that is already done too
            ready, _ = self.ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)
        out = []
        for ref in ready:
            task, attempt = self.refs.pop(ref)
            try:
                out.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as exc:  # the worker process or its node died
                text = " ".join(str(exc).split())
                reason = text.split(". ", 1)[0][:300]
                out.append(Result(task.id, attempt, False, 0.0, "?", "?", 0, error=f"{type(exc).__name__}: {reason}"))
        return out

    def in_flight(self) -> int:
        return len(self.refs)

    def warm(self, commands: list[str]) -> None:
        pass

    def stats(self) -> dict[str, float | int]:
        return {}

    def cancel(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()
