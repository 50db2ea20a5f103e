"""GPU check of the paper-sized distillation step (run it whenever a CUDA machine is available).

Usage::

    python -m benchmark.perf.gpu_check [--device cuda] [--iters 3] [--out results/perf/gpu_check.json]

NFNet-L0 (random init: no download needed) + text head 768→2304 at 224 px, syn_steps 8, 100 synthetic pairs of
random data of the right shapes, mini-batches of 20 and 40, one expert with 11 timestamps on local disk. For
``tesla`` (LoRS / PTM-ST step) and ``full`` (MTT-VL step, adjoint implementation) it prints seconds/iteration
(median after one warm-up; CUDA-synchronised) and peak allocated memory per step (``max_memory_allocated`` reset
before every step, minus the allocation at the start). Then the evaluation's batched students
(:mod:`benchmark.perf.students`): 3 and 5 default students (ConvNet w32 at 32 px, 100 pairs, 10 epochs) one by
one and as one vmapped model, seconds per student and the weights' largest difference. Last, the vectorisation
ceiling (:mod:`benchmark.perf.vector_ceiling`) of the default preset's matching iteration and student step on the
GPU: how much of a call is fixed per-operator cost (launches), so how much batching seeds or students could save
there at most. Sized to finish in a few minutes on one GPU.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmark.io import write_json
from benchmark.perf.bench_matching import PAPER_STUDENT, _med, make_experts, run_job

log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--iters", type=int, default=3, help="measured iterations per configuration (after 1 warm-up)")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check needs a GPU (use --device cpu only to test the script)")
    spec = dict(PAPER_STUDENT, image_size=args.image_size)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mmdd-gpu-check-") as tmp:
        experts = make_experts(Path(tmp), spec, n_experts=1, epochs=10)
        for mode in ("tesla", "full-adjoint"):
            for batch in (20, 40):
                job = {"kind": "engine", "device": args.device, "student": spec, "experts": str(experts),
                       "pairs": 100, "batch": batch, "iters": args.iters, "steps": 8, "mode": mode, "cache_mb": 0,
                       "threads": 0}
                r = run_job(job)
                rows.append({"mode": mode, "batch": batch, "syn_steps": 8, "s_per_iter": _med(r["sec"]),
                             "peak_mem_mb": max(r["mem"])})
                log.info("%-12s b=%-2d %.3f s/iter  %.0f MB", mode, batch, rows[-1]["s_per_iter"],
                         rows[-1]["peak_mem_mb"])
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"\nNFNet-L0 + text head, {args.image_size} px, syn_steps 8, 100 pairs, on {name}\n")
    print("| unroll | mini-batch | s/iter | peak memory (MB) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['batch']} | {r['s_per_iter']:.3f} | {r['peak_mem_mb']:.0f} |")
    from benchmark.perf.students import time_students

    students = [time_students(args.device, students=k, epochs=10) for k in (3, 5)]
    print("\n| evaluation students (ConvNet w32, 32 px, 100 pairs, 10 epochs) | one by one (s/student) | batched "
          "(s/student) | speed-up | max weight diff |\n|---|---|---|---|---|")
    for r in students:
        print(f"| {r['students']} | {r['sequential_s_per_student']:.3f} | {r['batched_s_per_student']:.3f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_weight_diff']:.1e} |")
    from benchmark.perf import vector_ceiling

    ceiling = vector_ceiling.measure(reps=10, device=args.device)
    print("\nvectorisation ceiling (default preset sizes; benchmark/perf/vector_ceiling.py)\n")
    print(vector_ceiling.render(ceiling))
    if args.out:
        write_json(args.out, {"device": name, "image_size": args.image_size, "rows": rows, "students": students,
                              "vector_ceiling": ceiling})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
