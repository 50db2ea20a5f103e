"""How much could vectorising over seeds or students save on this machine, at most?

Running K copies of a computation as one vectorised computation (``torch.func.vmap`` over stacked parameters, a
grouped convolution, ...) does the same arithmetic on the same number of elements; what it can remove is the
fixed cost every operator pays once per call — Python, dispatch, autograd bookkeeping, kernel launch — for K − 1 of
the copies. This script measures that fixed cost directly: it runs the *same sequence of operators* on tensors so
small that their arithmetic is negligible (8 px images, batch 2; the ConvNet's three 2× poolings still end at
1 × 1) and compares it with the real size. With ``full`` seconds per call at the real size and ``fixed`` seconds
at the tiny size, the best any vectorisation of K copies can do is

    ceiling(K) = K · full / (K · (full − fixed) + fixed)     (→ full / (full − fixed) as K → ∞),

an upper bound: it counts the tiny run's remaining arithmetic as removable and assumes the batched kernels are as
efficient as the single ones (on this CPU a vmapped convolution is slower: ``bench_throughput``'s "tried" rows).

Measured: one matching iteration of the default preset's ``tesla-vl`` and ``mtt-vl`` cells (convnet_w32_d3,
384-d text, P = 4, batch 25; :class:`methods.matching.engine.Matcher`) and one evaluation-student step
(:func:`benchmark.training.contrastive_step`, batch 100 — a whole 100-pair set). On CPU with 1 thread (as the
default preset runs); CUDA-synchronised on a GPU (``gpu_check`` runs it there, where launch latency makes the fixed
cost large). Medians after warm-up, real-size and tiny calls alternating so that a change of the machine's speed
hits both. The premise — same operators at both sizes — is checked by recording the ATen operators each call
dispatches.

Usage::

    python -m benchmark.perf.vector_ceiling [--device cpu] [--reps 15] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmark.experts.store import ExpertCollection
from benchmark.models.student import FlatStudent, build_student
from benchmark.perf import bench_matching as bm
from benchmark.perf.common import md_table, sync
from benchmark.training import SGDConfig, contrastive_step, make_optimizer
from methods.matching.config import EngineConfig
from methods.matching.engine import Matcher, PlanSampler
from methods.matching.teacher import RawTeacher

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
FULL = {"image_size": 32, "batch": 25, "eval_batch": 100}  # the default preset's cells
TINY = {"image_size": 8, "batch": 2, "eval_batch": 2}  # same operators, negligible arithmetic
MODES = {"tesla-vl": "tesla+retain", "mtt-vl": "full-graph"}  # default preset cell -> bench_matching mode
STEPS, PAIRS = 4, 100


def ceiling(full_s: float, fixed_s: float, k: int | float) -> float:
    """Best speed-up of K copies run as one vectorised computation over K runs one by one (module docstring)."""
    if not 0 <= fixed_s <= full_s:
        raise ValueError(f"need 0 <= fixed ({fixed_s}) <= full ({full_s})")
    if k == float("inf"):
        return float("inf") if fixed_s == full_s else full_s / (full_s - fixed_s)
    return k * full_s / (k * (full_s - fixed_s) + fixed_s)


class _OpTrace(TorchDispatchMode):
    """Records the ATen operators dispatched inside the block (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def op_trace(fn: Callable[[], Any]) -> list[str]:
    """The ATen operators one call of ``fn`` dispatches, in order."""
    with _OpTrace() as trace:
        fn()
    return trace.ops


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_medians(fns: list[Callable[[], Any]], reps: int, device: torch.device) -> list[float]:
    """Median seconds per call of each function, the calls alternating (f0, f1, f0, f1, ...) after two warm-up
    rounds, so a change of the machine's speed during the measurement hits every function alike."""
    for _ in range(2):  # warm-up: allocator, kernels, teacher cache
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            out.append(_timed(fn, device))
    return [statistics.median(t) for t in times]


def matching_iteration(cell: str, size: dict[str, int], experts_dir: Path,
                       device: torch.device) -> Callable[[], Any]:
    """One matching iteration (plan sampling, teacher read, both passes) of ``cell`` at ``size`` on ``device``;
    repeated calls continue the plan stream. ``experts_dir`` holds experts of the same image size."""
    spec = dict(bm.QUICK_STUDENT, image_size=size["image_size"])
    params = bm.engine_params(MODES[cell], STEPS, size["batch"], 1)
    params.update(similarity="none", loss="ce")  # as the default preset's cells
    cfg = EngineConfig.from_params(params, PAIRS)
    gen = torch.Generator().manual_seed(0)
    syn = bm._syn(cfg, bm.train_data(spec, PAIRS), PAIRS, device, gen)
    matcher = Matcher(FlatStudent(build_student(bm.student_config(spec), seed=0, device=device)), cfg, device)
    teacher = RawTeacher(ExpertCollection(experts_dir), cfg.teacher_cache_mb)
    sampler = PlanSampler(gen, PAIRS, size["batch"], len(teacher), (0, 2), STEPS)

    def step():
        plan = sampler.next()
        th0, th1 = teacher.endpoints(plan.expert, plan.start, 1, device)
        return matcher.step(syn, th0, th1, plan)

    return step


def student_step(size: dict[str, int], device: torch.device) -> Callable[[], Any]:
    """One evaluation-student SGD step (momentum 0.9, weight decay 5e-4) on a batch of ``size['eval_batch']``."""
    spec = dict(bm.QUICK_STUDENT, image_size=size["image_size"])
    model = build_student(bm.student_config(spec), seed=0, device=device)
    opt = make_optimizer(model, SGDConfig(0.1, 0.1, 0.9, 5e-4))
    data = bm.train_data(spec, size["eval_batch"])
    x, t = data.images.to(device), data.texts.to(device)
    return lambda: contrastive_step(model, opt, x, t, None, "ce")


def measure(reps: int = 15, threads: int = 1, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Full-size and tiny-size seconds per call, operator counts and ceilings for every measured computation."""
    dev = torch.device(device)
    torch.set_num_threads(threads)
    out: dict[str, Any] = {"device": str(dev), "threads": threads, "reps": reps, "full": FULL, "tiny": TINY,
                           "rows": {}}
    with tempfile.TemporaryDirectory(prefix="mmdd-ceiling-") as tmp:
        experts = {s["image_size"]: bm.make_experts(Path(tmp) / f"px{s['image_size']}",
                                                    dict(bm.QUICK_STUDENT, image_size=s["image_size"]), 2, 3)
                   for s in (FULL, TINY)}
        builders = {f"matching iteration, {cell} (P={STEPS}, b={FULL['batch']})":
                    (lambda s, c=cell: matching_iteration(c, s, experts[s["image_size"]], dev)) for cell in MODES}
        builders[f"evaluation student step (b={FULL['eval_batch']})"] = lambda s: student_step(s, dev)
        for name, build in builders.items():
            full_fn, tiny_fn = build(FULL), build(TINY)
            ops_full, ops_tiny = op_trace(full_fn), op_trace(tiny_fn)
            full_s, tiny_s = interleaved_medians([full_fn, tiny_fn], reps, dev)
            fixed = min(tiny_s, full_s)
            out["rows"][name] = {
                "full_s": full_s, "fixed_s": tiny_s, "ops": len(ops_full), "same_ops": ops_full == ops_tiny,
                "fixed_us_per_op": 1e6 * tiny_s / max(len(ops_tiny), 1), "fixed_fraction": fixed / full_s,
                "ceiling_k3": ceiling(full_s, fixed, 3), "ceiling_k5": ceiling(full_s, fixed, 5),
                "ceiling_inf": ceiling(full_s, fixed, float("inf"))}
            log.info("%s: %s", name, out["rows"][name])
    return out


def render(res: dict[str, Any]) -> str:
    """Markdown table of :func:`measure`'s rows."""
    where = f"{res['threads']} thread(s)" if res["device"] == "cpu" else res["device"]
    rows = [(where, "s per call", "fixed cost per call (s)", "ATen ops (same at both sizes)", "fixed share",
             "ceiling, 3 copies", "ceiling, 5 copies", "ceiling, any K")]
    for name, r in res["rows"].items():
        rows.append((name, f"{r['full_s']:.4f}", f"{r['fixed_s']:.4f} ({r['fixed_us_per_op']:.1f} µs/op)",
                     f"{r['ops']} ({'yes' if r['same_ops'] else 'NO'})", f"{100 * r['fixed_fraction']:.1f}%",
                     f"{r['ceiling_k3']:.2f}x", f"{r['ceiling_k5']:.2f}x", f"{r['ceiling_inf']:.2f}x"))
    return md_table(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="torch device [cpu]")
    ap.add_argument("--reps", type=int, default=15, help="timed calls per row after 2 warm-up calls [15]")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads [1, as the default preset]")
    ap.add_argument("--out", default=str(REPO / "results/perf/vector_ceiling.json"), help="JSON output")
    ap.add_argument("--json", action="store_true", help="print the JSON result only (used by bench_throughput)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    res = measure(args.reps, args.threads, args.device)
    if args.json:
        print(json.dumps(res))
        return 0
    res["table"] = render(res)
    print(res["table"])
    from benchmark.io import write_json

    write_json(Path(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
