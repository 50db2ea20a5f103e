"""Where tasks run: worker threads on this machine (``local``) or Ray tasks on a cluster (``ray``).

Both run :func:`benchmark.sweep.cell.run_task`; the driver (:mod:`benchmark.sweep.runner`) owns ordering, retries
and DVC. An executor only submits one attempt and reports how it ended, including a worker or node that died.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
from typing import Any, Protocol

from benchmark.sweep.cell import Result, run_task
from benchmark.sweep.stages import SweepError, Task

log = logging.getLogger(__name__)


class Executor(Protocol):
    description: str

    def submit(self, task: Task, attempt: int) -> None: ...

    def wait(self, timeout: float) -> list[Result]:
        """Results of attempts that finished (waits up to ``timeout`` seconds for the first one)."""
        ...

    def in_flight(self) -> int: ...

    def cancel(self) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Up to ``jobs`` tasks at once on this machine, each a subprocess started from a worker thread."""

    def __init__(self, root: str, env: dict[str, str], jobs: int = 1, device: str | None = None):
        if jobs < 1:
            raise SweepError(f"--jobs must be at least 1, not {jobs}")
        self.root, self.env, self.device = root, dict(env), device
        if jobs > 1 and "OMP_NUM_THREADS" not in os.environ:  # parallel cells share the cores
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
        self.pool = cf.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="mmdd-sweep")
        self.futures: dict[cf.Future, tuple[Task, int]] = {}
        self.description = f"local, {jobs} at a time"

    def submit(self, task: Task, attempt: int) -> None:
        device = self.device if task.wants_gpu else None
        fut = self.pool.submit(run_task, task, self.root, attempt, self.env, device, "local")
        self.futures[fut] = (task, attempt)

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

    def cancel(self) -> None:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)

    def close(self) -> None:
        self.ray.shutdown()
