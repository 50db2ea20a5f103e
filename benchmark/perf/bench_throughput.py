"""Throughput of the benchmark grid on this machine: today's path (one subprocess per DVC stage) against persistent
workers (``mmdd sweep --tasks worker``), side by side on the same reduced quick grid, plus the student-step
variants that were tried and did not pay.

Usage::

    python -m benchmark.perf.bench_throughput [--quick] [--jobs 2] [--out results/perf/throughput.json]

What it does, in a temporary directory:

1. **Grid** — a copy of the project with the default preset (at the former quick sizes) reduced to ``random``
   and ``tesla-vl`` on ``shapes`` (default: budgets 50 and 100, seed 0, 3 experts; ``--quick``: budget 50, 2
   experts, 10 evaluation epochs and fewer images). Fetch, embed and experts run once; then two identical copies
   run every distill and evaluate cell with ``mmdd sweep -j JOBS``, one with ``--tasks subprocess`` and one with
   ``--tasks worker``. Reported per path: grid wall time, DVC bookkeeping and start-up share (``sweep.json``),
   seconds per converged matching cell (a ``tesla-vl`` distill task at the quick preset's 40 iterations), seconds
   per evaluation student end to end (evaluate task seconds / students, process overhead included), distillation
   iterations per CPU-second (the task's own process CPU time: ``wait4`` for a subprocess, ``process_time`` in a
   worker), peak RSS per process, CPU seconds of the whole sweep (``RUSAGE_CHILDREN``) and whether both copies
   recorded the same output hashes.
2. **Jobs × threads** — two evaluate cells (``--force``) as 1 job × 2 torch threads (one after the other), as
   2 jobs × 1 thread and as 2 jobs × 2 threads (side by side), each cell its own ``mmdd evaluate`` process; the
   last with OpenMP's default waits and with ``OMP_WAIT_POLICY=PASSIVE``, which ``mmdd sweep -j N`` sets for
   both paths of the grid (so the grid's ratio does not include it); then two matching cells (``distill
   --force``) side by side with 2 threads each, both ways, with their iterations per CPU-second.
3. **Tried, did not pay** (one fresh interpreter, 1 thread unless the row says otherwise): 5 quick students
   (convnet_w32_d3, 32 px, 384-d text, batch 25) as one ``torch.func.vmap(grad(loss))`` over stacked parameters vs
   5 sequential gradient calls; the evaluation's batched students (:mod:`benchmark.perf.students`: 3 students,
   100 pairs, 10 epochs, trained one by one and batched); ``torch.compile`` of the student training step;
   ``channels_last``; 1 vs 2 intra-op threads for the step. Medians over repeated steps after warm-up.
4. **Vectorisation ceiling** (:mod:`benchmark.perf.vector_ceiling`, a fresh interpreter, 1 thread as the default
   preset runs): the share of a default-preset matching iteration and student step that is fixed per-operator cost,
   hence the most that batching 3 or 5 seeds or students into one vectorised computation could save here.
5. **Yardstick** — the matching engine's TESLA iteration against the reference-style loop of
   :mod:`benchmark.perf.bench_matching` (quick student, P=4, batch 25), interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmark.perf.common import md_table
from benchmark.perf.repo import copy_repo

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
MATCHING_ITERATIONS = 40  # the quick profile's tesla-vl iteration count: a throughput probe, not a converged cell
MODES = ("subprocess", "worker")


@dataclass(frozen=True)
class GridSize:
    """The reduced grid: ``mmdd init-params --preset default`` with overrides back to the former quick preset's
    sizes (4-epoch experts, 2 students, 2 threads, the quick profile's method defaults), restricted."""

    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    experts: int
    eval_epochs: int
    images: tuple[int, int, int] = (1000, 200, 500)  # shapes train / val / test images (the quick preset's)

    def overrides(self) -> list[str]:
        n_train, n_val, n_test = self.images
        out = ["grid.methods=[random,tesla-vl]", f"grid.budgets=[{','.join(map(str, self.budgets))}]",
               f"grid.seeds=[{','.join(map(str, self.seeds))}]", f"experts.num_experts={self.experts}",
               f"eval.epochs={self.eval_epochs}", "eval.eval_every=10", f"data.shapes.n_train={n_train}",
               f"data.shapes.n_val={n_val}", f"data.shapes.n_test={n_test}", "experts.epochs=4", "eval.students=2",
               "full_data.epochs=5", "full_data.expert_epochs=[]", "threads=2", "methods={}", "report.study=[]",
               # the grid it measured before cross-architecture evaluation existed
               "cross_arch.towers=[]", "cross_arch.methods=[]"]
        return [a for o in out for a in ("-S", o)]


FULL = GridSize(budgets=(50, 100), seeds=(0,), experts=3, eval_epochs=30)
QUICK = GridSize(budgets=(50,), seeds=(0,), experts=2, eval_epochs=10, images=(300, 100, 200))


# ------------------------------------------------------------------------------------------------ processes
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["TQDM_DISABLE"] = "1"
    env.update(extra)
    return env


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(cmd: list[str], cwd: Path, **env: str) -> tuple[float, float]:
    """Run a command to completion; (wall seconds, CPU seconds of it and its descendants). Raises on failure."""
    t0, c0 = time.perf_counter(), _children_cpu()
    res = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd} ({res.returncode}):\n{res.stderr[-4000:]}")
    return time.perf_counter() - t0, _children_cpu() - c0


# ------------------------------------------------------------------------------------------------ grid
def make_base(tmp: Path, size: GridSize, jobs: int) -> tuple[Path, float]:
    """A project copy with the reduced grid's upstream stages (fetch, embed, experts) done; and their seconds."""
    root = copy_repo(tmp / "base")
    _run(["git", "init", "-q"], root)
    _run([sys.executable, "-m", "benchmark.cli", "init-params", "--preset", "default", *size.overrides()], root)
    wall, _ = _run([sys.executable, "-m", "benchmark.sweep", "experts", "-j", str(jobs)], root)
    return root, wall


def _attempts(summary: dict) -> list[dict]:
    return [a | {"stage": name} for name, s in summary["stages"].items() for t in s["tasks"] for a in t["attempts"]]


def _lock_outs(root: Path, names: set[str]) -> dict[str, list]:
    stages = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {n: sorted((o["path"], o["md5"]) for o in stages[n].get("outs", [])) for n in names}


def run_grid(base: Path, tmp: Path, mode: str, jobs: int, students: int) -> dict[str, Any]:
    """Every distill and evaluate cell of the grid in a fresh copy of ``base`` through ``mmdd sweep``."""
    root = tmp / mode
    shutil.copytree(base, root, symlinks=True)
    wall, cpu = _run([sys.executable, "-m", "benchmark.sweep", "evaluate", "-j", str(jobs), "--tasks", mode], root)
    summary = json.loads((root / "results/logs/sweep.json").read_text())
    attempts = _attempts(summary)
    matching = [a for a in attempts if a["stage"].startswith("distill-tesla-vl@")]
    evaluate = [a for a in attempts if a["stage"].startswith("evaluate@")]
    timing = summary["timing"]
    ran = {a["stage"] for a in attempts}
    return {
        "mode": mode, "jobs": jobs, "root": str(root), "wall_s": wall, "sweep_wall_s": timing["wall_s"],
        "cpu_s": cpu, "stages": len(ran), "task_s": timing["task_s"], "dvc_s": timing["dvc_s"],
        "tracking_wait_s": timing["tracking_wait_s"],
        "worker_start_s": timing.get("worker_start_s", 0.0), "overhead_fraction": timing["overhead_fraction"],
        "s_per_matching_cell": statistics.median(a["seconds"] for a in matching),
        "matching_iters_per_cpu_s": statistics.median(MATCHING_ITERATIONS / a["cpu_s"] for a in matching),
        "s_per_eval_student": statistics.median(a["seconds"] for a in evaluate) / students,
        "peak_rss_mb": max(a["max_rss_mb"] for a in attempts), "outs": _lock_outs(root, ran)}


def _side_by_side(root: Path, cmds: list[list[str]], **extra: str) -> tuple[float, float]:
    """The commands at once, with OpenMP's default waits unless ``extra`` sets them; (wall s, CPU s of all)."""
    env = _env()
    env.pop("OMP_WAIT_POLICY", None)
    env.update(extra)
    t0, c0 = time.perf_counter(), _children_cpu()
    procs = [subprocess.Popen(c, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for c in cmds]
    if any(p.wait() for p in procs):
        raise RuntimeError(f"a concurrent command failed: {cmds}")
    return time.perf_counter() - t0, _children_cpu() - c0


def _cell_cmd(stage: str, cell: tuple[str, int, int], threads: int) -> list[str]:
    method, budget, seed = cell
    return [sys.executable, "-m", "benchmark.cli", stage, "--method", method, "--budget", str(budget), "--seed",
            str(seed), "--force", "--no-progress", "-S", f"threads={threads}", "-S", "tracking.enabled=false"]


def matching_waits(root: Path, cells: list[tuple[str, int, int]]) -> dict[str, float]:
    """Two matching cells (``distill --force``) side by side with 2 threads each, as the grid runs them, under
    OpenMP's default (spinning) and passive waits: wall seconds and distillation iterations per CPU-second."""
    out: dict[str, float] = {}
    for name, extra in (("spinning", {}), ("passive", {"OMP_WAIT_POLICY": "PASSIVE"})):
        wall, cpu = _side_by_side(root, [_cell_cmd("distill", c, 2) for c in cells], **extra)
        out[f"{name}_wall_s"], out[f"{name}_iters_per_cpu_s"] = wall, len(cells) * MATCHING_ITERATIONS / cpu
    return out


def jobs_by_threads(root: Path, cells: list[tuple[str, int, int]]) -> dict[str, float]:
    """Two evaluate cells (``--force``) as 1 job x 2 threads (one after the other), 2 jobs x 1 thread and 2 jobs x 2
    threads (side by side, as the grid's ``-j2`` with its ``threads: 2``); 2 x 2 both with OpenMP's default
    (spinning) waits and with the passive waits ``mmdd sweep -j N`` sets
    (:func:`benchmark.sweep.executors.parallel_env`)."""
    def side_by_side(threads, **extra):
        return _side_by_side(root, [_cell_cmd("evaluate", c, threads) for c in cells], **extra)[0]

    t0 = time.perf_counter()
    for cell in cells:
        _run(_cell_cmd("evaluate", cell, 2), root)
    return {"1x2_s": time.perf_counter() - t0, "2x1_s": side_by_side(1), "2x2_s": side_by_side(2),
            "2x2_passive_s": side_by_side(2, OMP_WAIT_POLICY="PASSIVE")}


# ------------------------------------------------------------------------------------------------ student step
def _median_time(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def micro(reps: int, compile_step: bool = True) -> dict[str, float]:
    """The student-step variants (run in a fresh interpreter: ``--micro``)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call, grad, stack_module_state, vmap

    from benchmark.models.student import StudentConfig, build_student
    from benchmark.models.towers import load_tower_config

    torch.set_num_threads(1)
    cfg = StudentConfig(tower="convnet_w32_d3", text_dim=384, pretrained=False,
                        tower_config=load_tower_config("convnet_w32_d3"))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(25, 3, 32, 32, generator=g), torch.randn(25, 384, generator=g)
    target = torch.arange(25)
    models = [build_student(cfg, seed=k).eval() for k in range(5)]  # eval: no dropout, so vmap needs no randomness

    def loss_of(logits):
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def sequential():
        for m in models:
            torch.autograd.grad(loss_of(m(x, t)), list(m.parameters()))

    params, buffers = stack_module_state(models)
    base = models[0]

    def f(p, b):
        return loss_of(functional_call(base, (p, b), (x, t)))

    batched = vmap(grad(f), in_dims=(0, 0))
    out = {"seq_5_students_s": _median_time(sequential, reps),
           "vmap_5_students_s": _median_time(lambda: batched(params, buffers), reps)}

    model = build_student(cfg, seed=0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(m, xx):
        opt.zero_grad(set_to_none=True)
        loss_of(m(xx, t)).backward()
        opt.step()

    from benchmark.perf.students import time_students

    out["students"] = time_students("cpu", students=3, epochs=10)
    out["eager_step_s"] = _median_time(lambda: step(model, x), reps)
    torch.set_num_threads(2)
    out["eager_step_2threads_s"] = _median_time(lambda: step(model, x), reps)
    torch.set_num_threads(1)
    model_cl, x_cl = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    out["channels_last_step_s"] = _median_time(lambda: step(model_cl, x_cl), reps)
    model = model.to(memory_format=torch.contiguous_format)
    if not compile_step:
        return out
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    step(compiled, x)  # compiles forward and backward
    out["compile_first_step_s"] = time.perf_counter() - t0
    out["compiled_step_s"] = _median_time(lambda: step(compiled, x), reps)
    out.update(_compiled_vs_eager(cfg, x, t, loss_of))
    return out


def _compiled_vs_eager(cfg, x, t, loss_of) -> dict[str, float | bool]:
    """One SGD step from the same initialisation, eager and compiled: are the updated parameters bitwise equal?"""
    import torch

    from benchmark.models.student import build_student

    after = []
    for compile_it in (False, True):
        torch.manual_seed(0)
        model = build_student(cfg, seed=0).train()
        run = torch.compile(model) if compile_it else model
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loss_of(run(x, t)).backward()
        opt.step()
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    return {"compiled_bitwise": bool(torch.equal(*after)),
            "compiled_max_diff": float((after[0] - after[1]).abs().max())}


def run_micro(reps: int, compile_step: bool) -> dict[str, float]:
    flags = [] if compile_step else ["--no-compile"]
    res = subprocess.run([sys.executable, "-m", "benchmark.perf.bench_throughput", "--micro", str(reps), *flags],
                         cwd=REPO,
                         env=_env(OMP_NUM_THREADS="2"), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"student-step measurements failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_ceiling(reps: int) -> dict[str, Any]:
    """:func:`benchmark.perf.vector_ceiling.measure` in a fresh interpreter (1 thread)."""
    res = subprocess.run([sys.executable, "-m", "benchmark.perf.vector_ceiling", "--json", "--reps", str(reps)],
                         cwd=REPO, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"vectorisation ceiling failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def yardstick(iters: int) -> dict[str, float]:
    """The engine's TESLA iteration vs the reference-style loop (bench_matching's interleaved 'ab' job)."""
    from benchmark.perf import bench_matching as bm

    with tempfile.TemporaryDirectory(prefix="mmdd-yard-") as tmp:
        experts = bm.make_experts(Path(tmp), bm.QUICK_STUDENT, n_experts=3, epochs=10)
        ab = bm.run_job({"kind": "ab", "mode": "tesla", "steps": 4, "batch": 25, "pairs": 50, "iters": iters,
                         "device": "cpu", "student": bm.QUICK_STUDENT, "experts": str(experts), "threads": 1})
    return {"engine_s_per_iter": statistics.median(ab["engine_s"]),
            "yardstick_s_per_iter": statistics.median(ab["yard_s"]), "speedup": statistics.median(ab["ratio"])}


# ------------------------------------------------------------------------------------------------ report
def render(res: dict[str, Any]) -> str:
    sub, work = res["grid"]["subprocess"], res["grid"]["worker"]

    def row(label, key, fmt="{:.2f}"):
        return (label, fmt.format(sub[key]), fmt.format(work[key]), f"{sub[key] / work[key]:.2f}x")

    grid = md_table([
        ("per path (same grid, -j%d)" % sub["jobs"], "subprocess per stage", "persistent workers", "ratio"),
        row("grid wall (s)", "wall_s", "{:.1f}"),
        row("CPU of the sweep, all processes (s)", "cpu_s", "{:.1f}"),
        row("summed task seconds (process start-up included)", "task_s", "{:.1f}"),
        (f"s per converged matching cell (tesla-vl, {MATCHING_ITERATIONS} it)", f"{sub['s_per_matching_cell']:.2f}",
         f"{work['s_per_matching_cell']:.2f}", f"{sub['s_per_matching_cell'] / work['s_per_matching_cell']:.2f}x"),
        row("s per evaluation student, end to end", "s_per_eval_student"),
        ("distillation iterations per CPU-second", f"{sub['matching_iters_per_cpu_s']:.2f}",
         f"{work['matching_iters_per_cpu_s']:.2f}",
         f"{work['matching_iters_per_cpu_s'] / sub['matching_iters_per_cpu_s']:.2f}x (higher is better)"),
        ("peak RSS per process (MB)", f"{sub['peak_rss_mb']:.0f}", f"{work['peak_rss_mb']:.0f}", "-"),
        ("DVC bookkeeping (s)", f"{sub['dvc_s']:.1f}", f"{work['dvc_s']:.1f}", "-"),
        ("start-up + bookkeeping share of wall", f"{100 * sub['overhead_fraction']:.1f}% (+ per-stage start-up "
         "inside tasks)", f"{100 * work['overhead_fraction']:.1f}%", "-"),
        ("recorded output hashes identical", res["grid"]["identical"], "", ""),
    ])
    m, jt = res["micro"], res.get("jobs_threads")
    compiled = [("torch.compile student step vs eager (compile itself: %.1f s)" % m["compile_first_step_s"],
                 f"{m['eager_step_s']:.4f}", f"{m['compiled_step_s']:.4f}",
                 ("faster per step, " if m["compiled_step_s"] < m["eager_step_s"] else "slower per step, ")
                 + ("same numbers" if m["compiled_bitwise"] else
                    f"different numbers (max abs param diff {m['compiled_max_diff']:.1e} after one step)"))] \
        if "compiled_step_s" in m else [("torch.compile student step", "-", "-", "skipped (--quick / --no-compile)")]
    tried = md_table([
        ("tried", "baseline (s)", "variant (s)", "verdict"),
        ("vmap(grad) over 5 stacked students vs 5 sequential grads (b=25, 1 thread)",
         f"{m['seq_5_students_s']:.3f}", f"{m['vmap_5_students_s']:.3f}",
         "pays" if m["vmap_5_students_s"] < m["seq_5_students_s"] else "did not pay"),
        ("evaluation students batched (benchmark/students_batched.py: %d students, %d pairs, %d epochs; "
         "s per student; max weight diff %.1e in float32)" % (m["students"]["students"], m["students"]["pairs"],
                                                             m["students"]["epochs"],
                                                             m["students"]["max_abs_weight_diff"]),
         f"{m['students']['sequential_s_per_student']:.3f}", f"{m['students']['batched_s_per_student']:.3f}",
         ("pays" if m["students"]["speedup"] > 1 else "did not pay") + " on this CPU: `--students auto` trains "
         "them one by one here"),
        *compiled,
        ("channels_last student step vs contiguous", f"{m['eager_step_s']:.4f}", f"{m['channels_last_step_s']:.4f}",
         "pays" if m["channels_last_step_s"] < m["eager_step_s"] else "did not pay"),
        ("student step: 2 threads vs 1", f"{m['eager_step_s']:.4f}", f"{m['eager_step_2threads_s']:.4f}",
         f"{m['eager_step_s'] / m['eager_step_2threads_s']:.2f}x from the 2nd thread"),
    ] + ([("2 evaluate cells (s): 1 job x 2 threads vs 2 jobs x 1 thread", f"{jt['1x2_s']:.1f}",
           f"{jt['2x1_s']:.1f}", "2x1 faster" if jt["2x1_s"] < jt["1x2_s"] else "1x2 faster"),
          ("2 evaluate cells (s): 2 jobs x 1 thread vs 2 jobs x 2 threads (oversubscribed)", f"{jt['2x1_s']:.1f}",
           f"{jt['2x2_s']:.1f}", "2x2 faster" if jt["2x2_s"] < jt["2x1_s"] else "2x2 slower: did not pay")]
         if jt else []))
    parts = [grid, tried]
    mw = res.get("matching_waits")
    if jt and mw:
        parts.append(md_table([
            ("2 jobs x 2 threads on this machine (kept: `mmdd sweep -j N` sets passive waits)", "OpenMP default",
             "passive", "ratio"),
            ("2 evaluate cells, wall (s)", f"{jt['2x2_s']:.1f}", f"{jt['2x2_passive_s']:.1f}",
             f"{jt['2x2_s'] / jt['2x2_passive_s']:.2f}x"),
            ("2 matching cells (tesla-vl, %d it), wall (s)" % MATCHING_ITERATIONS, f"{mw['spinning_wall_s']:.1f}",
             f"{mw['passive_wall_s']:.1f}", f"{mw['spinning_wall_s'] / mw['passive_wall_s']:.2f}x"),
            ("distillation iterations per CPU-second", f"{mw['spinning_iters_per_cpu_s']:.2f}",
             f"{mw['passive_iters_per_cpu_s']:.2f}",
             f"{mw['passive_iters_per_cpu_s'] / mw['spinning_iters_per_cpu_s']:.2f}x (higher is better)")]))
    if "ceiling" in res:
        from benchmark.perf.vector_ceiling import render as render_ceiling

        parts.append(render_ceiling(res["ceiling"]))
    y = res["yardstick"]
    yard = md_table([("matching iteration (quick student, TESLA P=4, b=25)", "s/iter"),
                   ("engine", f"{y['engine_s_per_iter']:.3f}"),
                   ("reference-style loop (bench_matching yardstick)", f"{y['yardstick_s_per_iter']:.3f}"),
                   ("engine speed-up", f"{y['speedup']:.2f}x")])
    return "\n\n".join([*parts, yard])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid and fewer repetitions (~2 min on 2 cores)")
    ap.add_argument("--jobs", type=int, default=2, help="sweep tasks at a time [2]")
    ap.add_argument("--out", default=str(REPO / "results/perf/throughput.json"), help="JSON output")
    ap.add_argument("--keep", action="store_true", help="keep the temporary projects (their paths are printed)")
    ap.add_argument("--no-compile", action="store_true",
                    help="skip the torch.compile row (compiling alone takes ~40 s on 2 cores; implied by --quick)")
    ap.add_argument("--micro", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.micro is not None:
        print(json.dumps(micro(args.micro, not args.no_compile)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    size = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    res: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "jobs": args.jobs, "grid_size": size.__dict__,
                           "matching_iterations": MATCHING_ITERATIONS}
    tmp = Path(tempfile.mkdtemp(prefix="mmdd-throughput-"))
    try:
        base, res["upstream_s"] = make_base(tmp, size, args.jobs)
        log.info("upstream stages done in %.1f s (%s)", res["upstream_s"], base)
        students = 2  # the quick preset's eval.students
        res["grid"] = {}
        for mode in MODES:
            res["grid"][mode] = run_grid(base, tmp, mode, args.jobs, students)
            log.info("%s: grid in %.1f s", mode, res["grid"][mode]["wall_s"])
        outs = [res["grid"][m].pop("outs") for m in MODES]
        res["grid"]["identical"] = "yes" if outs[0] == outs[1] else "NO"
        if not args.quick:
            cells = [("tesla-vl", b, size.seeds[0]) for b in size.budgets[:2]]
            res["jobs_threads"] = jobs_by_threads(tmp / "worker", cells)
            log.info("jobs x threads: %s", res["jobs_threads"])
            res["matching_waits"] = matching_waits(tmp / "worker", cells)
            log.info("matching, 2 x 2 threads: %s", res["matching_waits"])
        res["micro"] = run_micro(5 if args.quick else 20, not (args.quick or args.no_compile))
        log.info("student-step variants: %s", res["micro"])
        res["ceiling"] = run_ceiling(5 if args.quick else 15)
        res["yardstick"] = yardstick(2 if args.quick else 4)
    finally:
        if args.keep:
            log.info("projects kept under %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["bench_s"] = time.perf_counter() - t0
    table = render(res)
    print(table)
    print(f"\n(bench: {res['bench_s']:.0f} s; upstream fetch/embed/experts once: {res['upstream_s']:.0f} s)")
    res["table"] = table
    from benchmark.io import write_json

    write_json(Path(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
