"""``mmdd sweep``: run the stale part of the DVC pipeline on this machine or a Ray cluster (docs/cluster.md).

Every stage of ``dvc.yaml`` (fetch → embed → experts, one task per expert → prepare → distill cells → evaluate cells
→ full-data → report) runs its exact command as one task; each finished stage is recorded in ``dvc.lock`` as
``dvc commit`` would, so ``dvc status`` is clean afterwards and DVC and MLflow stay the record. Locally, plain
``mmdd`` commands run in persistent worker processes by default (``--tasks worker``), so a stage does not pay for
importing torch and MLflow again.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import logging
import time
from pathlib import Path

log = logging.getLogger("mmdd.sweep")


def _gpus(value: str) -> str | float:
    if value == "auto":
        return value
    try:
        gpus = float(value)
    except ValueError:
        gpus = -1.0
    if gpus < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of GPUs >= 0, got {value!r}")
    return gpus


def add_sweep_command(subparsers) -> argparse.ArgumentParser:
    """Add ``sweep`` to the ``mmdd`` subcommands (``subparsers`` from ``ArgumentParser.add_subparsers``)."""
    text = "run the stale grid cells of the DVC pipeline in parallel, locally or on a Ray cluster"
    p = subparsers.add_parser("sweep", help=text, description=text)
    p.add_argument("targets", nargs="*", metavar="STAGE",
                   help="stages or stage groups (e.g. distill-lors) to bring up to date, with everything upstream "
                        "[the whole pipeline]")
    p.add_argument("--runner", choices=("local", "ray"), default="local", help="where tasks run [local]")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (HOST:PORT or auto) [RAY_ADDRESS, else a new single-machine Ray]")
    p.add_argument("-j", "--jobs", type=int, default=1, help="local runner: tasks at a time [1]")
    p.add_argument("--tasks", choices=("worker", "subprocess"), default="worker",
                   help="local runner: run plain `mmdd` stage commands in-process in --jobs persistent worker "
                        "processes (worker), or each in its own subprocess (subprocess) [worker]")
    p.add_argument("--retries", type=int, default=2, help="extra attempts for a failing task [2]")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="ray runner: CPUs reserved per task [1]")
    p.add_argument("--gpus-per-task", type=_gpus, default="auto",
                   help="ray runner: GPUs per embed/experts/distill/evaluate/full-data task (auto: 1 when the "
                        "cluster has GPUs, else 0) [auto]")
    p.add_argument("--device", default=None, help="local runner: --device for those stages, e.g. cuda [as dvc.yaml]")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for every task (repeatable); MLFLOW_* and MMDD_* are forwarded already")
    p.add_argument("--log-dir", default="results/logs", help="per-task logs and sweep.json, under the project "
                   "[results/logs]")
    p.add_argument("--project", default=".", help="project directory; for ray, a path every node mounts [.]")
    p.add_argument("--dry-run", action="store_true", help="list the stale stages by dependency level and exit")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run ``mmdd sweep``; 0 when every selected stage is up to date afterwards, 1 when some failed or were blocked.

    Raises :class:`~benchmark.sweep.stages.SweepError` (a RuntimeError) for a problem found before anything runs.
    """
    from benchmark.sweep.runner import Sweep, prepare_tracking, task_env
    from benchmark.sweep.stages import SweepError

    root = Path(args.project).resolve()
    if args.dry_run:
        return _dry_run(root, args.targets)
    if args.address and args.runner != "ray":
        raise SweepError(f"--address {args.address} is a Ray cluster address: add --runner ray")
    started = time.perf_counter()
    sweep = Sweep(root, args.retries, args.log_dir, args.targets)  # reads the pipeline: fails before any start-up
    env = task_env(args.env)
    if args.runner == "ray":
        from benchmark.sweep.executors import RayExecutor

        executor = RayExecutor(str(root), env, args.address, args.cpus_per_task, args.gpus_per_task)
    else:
        from benchmark.sweep.executors import LocalExecutor

        # `mmdd bench` passes no --tasks: it gets the default, persistent workers
        executor = LocalExecutor(str(root), env, args.jobs, args.device, getattr(args, "tasks", "worker"),
                                 args.log_dir)
    # MLflow's experiments are created before the first task, while the driver asks DVC what is stale
    with cf.ThreadPoolExecutor(1, thread_name_prefix="mmdd-tracking") as background:
        tracking = background.submit(prepare_tracking, root, env, distributed=args.runner == "ray")
        try:
            summary = sweep.run(executor, before_tasks=tracking.result, started=started)
        finally:
            executor.close()
    return 0 if summary.ok else 1


def _dry_run(root: Path, targets: list[str]) -> int:
    """List the stale stages by dependency level, or say that there is nothing to do."""
    from benchmark.sweep.runner import plan

    levels = plan(root, targets)
    if not any(levels):
        log.info("nothing to do: every selected stage is up to date (dvc status)")
        return 0
    for depth, names in enumerate(levels):
        for name in names:
            log.info("level %d: %s", depth, name)
    log.info("stages downstream of these run too when `dvc status` reports them changed after their upstream")
    return 0
