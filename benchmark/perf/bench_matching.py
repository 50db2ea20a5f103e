"""Time and memory of the trajectory-matching step, and its speed-up over a straightforward reference iteration.

Usage::

    python -m benchmark.perf.bench_matching [--steps 4 8 16] [--iters 5] [--paper] [--out PATH] [--device cpu]

Three tables:

1. **Scaling** — seconds/iteration and peak memory of ``tesla`` (recompute), ``tesla`` + ``retain_graph``, ``full``
   (``graph``) and ``full`` (``adjoint``) at ``syn_steps`` 4, 8, 16 on the quick student (convnet_w32_d3 at 32 px,
   384-d caption features, 50 synthetic pairs, batch 25). Each configuration runs in fresh subprocesses so that
   memory numbers are its own: on CPU the step's peak RSS minus the RSS when it started (``/proc/self/clear_refs``
   resets the high-water mark before every step), measured in a run whose glibc returns freed blocks at once
   (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``; times come from a second run with the default allocator,
   since that setting makes every large allocation page-fault); on CUDA ``max_memory_allocated`` minus the
   allocation at the start, with the peak reset per step. Times are the median over ``--iters`` iterations after
   one warm-up, wall clock and process CPU time (the machine may be shared); workers use ``--threads`` intra-op
   threads (default 1, the steadiest on a shared machine).
2. **Yardstick** — the engine's iteration (the method's real loop: teacher reads of two epochs, persistent student,
   first-order first pass) against a straightforward implementation of the reference iteration, kept here on
   purpose: every iteration it loads the *whole* expert file (every epoch of both towers), builds a fresh student,
   computes the first pass with ``create_graph=True`` and detaches it, then recomputes (TESLA) — or unrolls with one
   graph (MTT-VL). Both compute the gradient of the same plan (expert, start epoch, batches, dropout seeds); the
   table reports the time ratio, their largest relative difference in float64 (the same gradient) and the float32
   error of each against the float64 gradient (the engine forms θ0 − θ* first, exact in floating point, before
   subtracting ηG, and sums long dot products in chunks; the reference order θ0 − ηG − θ* can cancel). Times
   come from one process that alternates engine and yardstick iterations on the same plans (so machine load hits
   both alike); the speed-up is the median of the per-iteration ratios. Experts have 11 timestamps (10 epochs),
   as the reference's.
3. **Paper-sized student** (``--paper``) — NFNet-L0 (random init, 32.8 M parameters) + text head 768→2304 (7.1 M)
   at a small image size on CPU, few iterations; the teacher cache is off (with 20 experts it would not hold the
   working set), so the engine reads its two epochs from the memory-mapped file every iteration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmark import __version__
from benchmark.experts.store import ExpertCollection, write_expert
from benchmark.interface import DistillTask, JsonlLogger, TrainData
from benchmark.io import write_json
from benchmark.losses import get_loss
from benchmark.models.student import FlatStudent, StudentConfig, build_student
from benchmark.models.towers import load_tower_config
from methods.matching.config import EngineConfig
from methods.matching.engine import Matcher, MatchingEngine, StepMeter, StepPlan, SynState, replay_rng
from methods.matching.similarity import make_similarity
from methods.matching.teacher import RawTeacher

log = logging.getLogger(__name__)

QUICK_STUDENT = {"tower": "convnet_w32_d3", "text_dim": 384, "image_size": 32}
PAPER_STUDENT = {"tower": "nfnet_l0", "text_dim": 768, "image_size": 32}


# ------------------------------------------------------------------------------------------------------ setup
def student_config(spec: dict[str, Any]) -> StudentConfig:
    tower = load_tower_config(spec["tower"])
    tower["image_size"] = spec["image_size"]
    return StudentConfig(tower=spec["tower"], text_dim=spec["text_dim"], pretrained=False, tower_config=tower)


def make_experts(directory: Path, spec: dict[str, Any], n_experts: int, epochs: int) -> Path:
    """Random-walk trajectories from real initialisations (timing does not depend on the values)."""
    flat = FlatStudent(build_student(student_config(spec), seed=0))
    for k in range(n_experts):
        g = torch.Generator().manual_seed(k)
        traj = {}
        for m in ("img", "txt"):
            th = flat.flat(m).clone()
            traj[m] = [th.clone()]
            for _ in range(epochs):
                th = th + 1e-3 * torch.randn(th.shape, generator=g)
                traj[m].append(th.clone())
        meta = {"index": k, "config_hash": "bench", "param_names": flat.names,
                "param_shapes": {m: [list(s) for s in flat.shapes[m]] for m in flat.shapes}}
        write_expert(directory / f"expert_{k:03d}.safetensors", traj, meta)
    return directory


def train_data(spec: dict[str, Any], n: int = 200) -> TrainData:
    g = torch.Generator().manual_seed(0)
    s = spec["image_size"]
    return TrainData(torch.randn(n, 3, s, s, generator=g), torch.randn(n, spec["text_dim"], generator=g),
                     torch.arange(n))


def engine_params(mode: str, steps: int, batch: int, iters: int, cache_mb: int = 512) -> dict[str, Any]:
    base = {"syn_steps": steps, "batch_size": batch, "iterations": iters, "expert_epochs": 1,
            "start_window": [0, 2], "lr_img": 100.0, "lr_txt": 100.0, "lr_lr": 1e-3, "lr_sim": 10.0,
            "teacher_cache_mb": cache_mb}
    if mode.startswith("tesla"):
        base.update(unroll="tesla", similarity="lowrank", loss="wbce", sim_rank=5,
                    retain_graph=mode.endswith("+retain"))
    elif mode == "full-graph":
        base.update(unroll="full", full_impl="graph", similarity="none", loss="ce")
    elif mode == "full-adjoint":
        base.update(unroll="full", full_impl="adjoint", similarity="none", loss="ce")
    else:
        raise ValueError(mode)
    return base


# ------------------------------------------------------------------------------------------------------ yardstick
class Yardstick:
    """A straightforward implementation of the reference iteration (docs/methods.md#full-unroll, docs/methods.md#tesla), I/O included:
    whole-expert load, fresh student, create_graph in the first pass (TESLA) or one graph over the unroll (MTT)."""

    def __init__(self, cfg: EngineConfig, student: StudentConfig, experts_dir: Path, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.cfg, self.student, self.device, self.dtype = cfg, student, device, dtype
        self.paths = sorted(experts_dir.glob("expert_*.safetensors"))
        self.loss_fn = get_loss(cfg.loss)

    def _loss(self, flat, ti, tt, x, t, s, seed):
        with replay_rng(seed, self.device):
            e_i, e_t = flat.embed_images(x, ti), flat.embed_texts(t, tt)
            return self.loss_fn(flat.logit_scale * e_i @ e_t.T, s)

    def grads(self, syn: SynState, plan: StepPlan) -> dict[str, torch.Tensor]:
        plan = dataclasses.replace(plan, batches=[b.to(self.device) for b in plan.batches])  # as the engine does
        traj = load_file(str(self.paths[plan.expert]), device=str(self.device))  # every epoch of both towers
        traj = {k: v.to(self.dtype) for k, v in traj.items()}
        model = build_student(self.student, seed=0, device=self.device).to(self.dtype)
        model.train()
        flat = FlatStudent(model)
        th0 = {m: traj[f"{m}.e{plan.start:03d}"] for m in ("img", "txt")}
        th1 = {m: traj[f"{m}.e{plan.start + self.cfg.expert_epochs:03d}"] for m in ("img", "txt")}
        d = {m: (th0[m] - th1[m]).square().sum() for m in th0}
        return self._tesla(flat, syn, plan, th0, th1, d) if self.cfg.unroll == "tesla" else \
            self._full(flat, syn, plan, th0, th1, d)

    def _sim(self, syn, idx, grad):
        parts = syn.sim.gather(idx, grad)
        return parts, syn.sim.batch_matrix(parts)

    def _tesla(self, flat, syn, plan, th0, th1, d):
        eta = [float(v) for v in syn.lr]
        th = dict(th0)
        stored, G = [], {m: torch.zeros_like(th0[m]) for m in th0}
        for idx, seed in zip(plan.batches, plan.seeds):
            ti, tt = th["img"].clone().requires_grad_(), th["txt"].clone().requires_grad_()
            parts, s = self._sim(syn, idx, False)
            loss = self._loss(flat, ti, tt, syn.images[idx], syn.texts[idx], s, seed)
            gi, gt = torch.autograd.grad(loss, (ti, tt), create_graph=True)  # as the reference: graph, then detach
            gi, gt = gi.detach(), gt.detach()
            stored.append({"img": ti.detach(), "txt": tt.detach()})
            th = {"img": th["img"] - eta[0] * gi, "txt": th["txt"] - eta[1] * gt}
            G["img"] += gi
            G["txt"] += gt
        res = {m: th0[m] - eta[k] * G[m] - th1[m] for k, m in enumerate(("img", "txt"))}
        c = {m: eta[k] * (th1[m] - th0[m]) + eta[k] ** 2 * G[m] for k, m in enumerate(("img", "txt"))}
        w = {m: 1.0 / d[m] for m in d} if self.cfg.normalize == "separate" else \
            {m: 1.0 / (d["img"] + d["txt"]) for m in d}
        grads = {k: torch.zeros_like(v) for k, v in syn.tensors().items()}
        grads["lr"] = torch.stack([-2.0 * w[m] * torch.dot(G[m], res[m]) for m in ("img", "txt")])
        for (idx, seed), th_i in zip(zip(plan.batches, plan.seeds), stored):
            ti, tt = th_i["img"].requires_grad_(), th_i["txt"].requires_grad_()
            x = syn.images[idx].requires_grad_()
            t = syn.texts[idx].requires_grad_()
            parts, s = self._sim(syn, idx, True)
            loss = self._loss(flat, ti, tt, x, t, s, seed)
            gi, gt = torch.autograd.grad(loss, (ti, tt), create_graph=True)
            obj = 2.0 * (w["img"] * torch.dot(c["img"], gi) + w["txt"] * torch.dot(c["txt"], gt))
            out = torch.autograd.grad(obj, (x, t, *parts.values()), allow_unused=True)
            grads["images"].index_add_(0, idx, out[0])
            grads["texts"].index_add_(0, idx, out[1])
            syn.sim.scatter_(grads, idx, dict(zip(parts, out[2:])))
        return grads

    def _full(self, flat, syn, plan, th0, th1, d):
        eta = syn.lr.clone().requires_grad_()
        th = {m: th0[m].clone().requires_grad_() for m in th0}
        X = syn.images.clone().requires_grad_()
        T = syn.texts.clone().requires_grad_()
        for idx, seed in zip(plan.batches, plan.seeds):
            loss = self._loss(flat, th["img"], th["txt"], X[idx], T[idx], None, seed)
            gi, gt = torch.autograd.grad(loss, (th["img"], th["txt"]), create_graph=True)
            th = {"img": th["img"] - eta[0] * gi, "txt": th["txt"] - eta[1] * gt}
        J = sum((th[m] - th1[m]).square().sum() / d[m] for m in th)
        gx, gt_, ge = torch.autograd.grad(J, (X, T, eta))
        return {"images": gx, "texts": gt_, "lr": ge}


# ------------------------------------------------------------------------------------------------------ workers
def _syn(cfg: EngineConfig, train: TrainData, n: int, device, gen) -> SynState:
    idx = torch.randperm(train.n_pairs, generator=gen)[:n]
    x, t = train.pairs(idx)
    sim = make_similarity(cfg.similarity, n, gen, device)
    return SynState(x.to(device).clone(), t.to(device).clone(), torch.tensor([0.1, 0.1], device=device), sim)


def worker(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(job.get("threads") or torch.get_num_threads())
    device = torch.device(job["device"])
    spec = job["student"]
    student = student_config(spec)
    experts_dir = Path(job["experts"])
    train = train_data(spec)
    n, total = job["pairs"], job["iters"] + 1
    params = engine_params(job["mode"], job["steps"], job["batch"], total, job.get("cache_mb", 512))
    cfg = EngineConfig.from_params(params, n)
    if job["kind"] == "engine":
        cpu_marks: list[float] = []
        task = DistillTask(train=train, student=student, budget=n, seed=0, params=params, device=device,
                           experts=ExpertCollection(experts_dir), logger=JsonlLogger())
        cpu0 = time.process_time()
        MatchingEngine(task, cfg, "bench", [lambda *a: cpu_marks.append(time.process_time())]).run()
        recs = task.logger.records[1:]
        cpu = [b - a for a, b in zip([cpu0] + cpu_marks, cpu_marks)][1:]
        return {"sec": [r["sec_per_iter"] for r in recs], "cpu": cpu,
                "mem": [r["peak_mem_mb"] - r["mem_base_mb"] for r in recs],
                "io": [r["teacher_io_s"] for r in recs]}
    if job["kind"] == "yardstick":
        yard = Yardstick(cfg, student, experts_dir, device)
        gen = torch.Generator().manual_seed(0)
        syn = _syn(cfg, train, n, device, gen)
        from methods.matching.engine import PlanSampler

        sampler = PlanSampler(gen, n, cfg.batch_size or n, len(yard.paths), (0, 2), cfg.syn_steps)
        meter = StepMeter(device)
        sec, cpu, mem = [], [], []
        for _ in range(total):
            meter.start()
            c0 = time.process_time()
            grads = yard.grads(syn, sampler.next())
            with torch.no_grad():  # plain SGD update, as the engine's cost includes its update
                for k, v in syn.tensors().items():
                    v.sub_(0.01 * grads.get(k, torch.zeros_like(v)))
            dt, peak = meter.stop()
            sec.append(dt)
            cpu.append(time.process_time() - c0)
            mem.append(peak - meter.base_mb)
        return {"sec": sec[1:], "cpu": cpu[1:], "mem": mem[1:]}
    if job["kind"] == "ab":  # interleaved engine / yardstick iterations on the same plans (robust to machine load)
        from methods.matching.engine import EMA, MomentumSGD, PlanSampler, _finite

        gen = torch.Generator().manual_seed(0)
        syn_e = _syn(cfg, train, n, device, gen)
        syn_y = SynState(syn_e.images.clone(), syn_e.texts.clone(), syn_e.lr.clone(), syn_e.sim)
        matcher = Matcher(FlatStudent(build_student(student, seed=0, device=device)), cfg, device)
        teacher = RawTeacher(ExpertCollection(experts_dir), cfg.teacher_cache_mb)
        yard = Yardstick(cfg, student, experts_dir, device)
        opt = MomentumSGD({"images": (1.0, 0.5), "texts": (1.0, 0.5), "lr": (1e-3, 0.5), "sim": (1.0, 0.5)},
                          syn_e.tensors())
        ema = EMA(0.5, syn_e.tensors())
        sampler = PlanSampler(gen, n, cfg.batch_size or n, len(teacher), (0, 2), cfg.syn_steps)
        meter = StepMeter(device)
        te, ty = [], []
        for it in range(total):
            plan = sampler.next()
            order = ("e", "y") if it % 2 == 0 else ("y", "e")
            for who in order:
                meter.start()
                c0 = time.process_time()
                if who == "e":  # what one MatchingEngine iteration does (teacher reads, step, checks, update, EMA)
                    th0, th1 = teacher.endpoints(plan.expert, plan.start, cfg.expert_epochs, device)
                    res = matcher.step(syn_e, th0, th1, plan)
                    assert _finite(res)
                    opt.step(syn_e.tensors(), {k: 0.0 * g for k, g in res.grads.items()})  # keep the data fixed
                    ema.update(syn_e.tensors())
                else:
                    yard.grads(syn_y, plan)
                dt, _ = meter.stop()
                (te if who == "e" else ty).append((dt, time.process_time() - c0))
        te, ty = te[1:], ty[1:]
        return {"engine_s": [a for a, _ in te], "yard_s": [a for a, _ in ty], "engine_cpu": [b for _, b in te],
                "yard_cpu": [b for _, b in ty], "ratio": [b[0] / a[0] for a, b in zip(te, ty)],
                "cpu_ratio": [b[1] / a[1] for a, b in zip(te, ty)]}
    if job["kind"] == "check":  # the same plan through both, in float32 and in float64
        from methods.matching.engine import PlanSampler

        got = {}
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(1)
            syn = _syn(cfg, train, n, device, gen)
            syn = SynState(syn.images.to(dtype), syn.texts.to(dtype), syn.lr.to(dtype), syn.sim)
            syn.sim.tensors = {k: v.to(dtype) for k, v in syn.sim.tensors.items()}
            matcher = Matcher(FlatStudent(build_student(student, seed=0, device=device).to(dtype)), cfg, device)
            teacher = RawTeacher(ExpertCollection(experts_dir), 0)
            plan = PlanSampler(gen, n, cfg.batch_size or n, len(teacher), (0, 2), cfg.syn_steps).next()
            th0, th1 = teacher.endpoints(plan.expert, plan.start, 1, device, dtype)
            eng = {k: v.double().cpu() for k, v in matcher.step(syn, th0, th1, plan).grads.items()}
            yard = {k: v.double().cpu() for k, v in Yardstick(cfg, student, experts_dir, device, dtype)
                    .grads(syn, plan).items()}
            got[dtype] = (eng, yard)
            del matcher
        ref = got[torch.float64][0]

        def err(a):
            return max(float((a[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-300)) for k in a)

        return {"f64_engine_vs_yardstick": err(got[torch.float64][1]), "f32_engine_err": err(got[torch.float32][0]),
                "f32_yardstick_err": err(got[torch.float32][1])}
    raise ValueError(job["kind"])


def run_job(job: dict[str, Any], strict_malloc: bool = False) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter. ``strict_malloc`` makes glibc return freed memory at once (mmap
    for every block ≥ 64 KiB, no trim slack) so RSS follows live tensors — right for memory, but every large
    allocation then page-faults afresh, so times are taken from a separate run with the default allocator."""
    env = dict(os.environ, TQDM_DISABLE="1")
    if strict_malloc:
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-m", "benchmark.perf.bench_matching", "--worker", json.dumps(job)],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    if out.returncode != 0:
        raise RuntimeError(f"worker {job['kind']} {job['mode']} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _med(v: list[float]) -> float:
    return statistics.median(v) if v else float("nan")


def compare(label: str, job: dict[str, Any]) -> dict[str, Any]:
    """Engine vs yardstick on one configuration: times (default allocator), memory (strict), gradient check."""
    ab = run_job(dict(job, kind="ab"))
    eng_m, yard_m = run_job(dict(job, kind="engine"), True), run_job(dict(job, kind="yardstick"), True)
    chk = run_job(dict(job, kind="check"))
    row = {"config": label, "engine_s": _med(ab["engine_s"]), "yardstick_s": _med(ab["yard_s"]),
           "speedup": _med(ab["ratio"]), "cpu_speedup": _med(ab["cpu_ratio"]),
           "engine_cpu_s": _med(ab["engine_cpu"]), "yardstick_cpu_s": _med(ab["yard_cpu"]),
           "engine_mem_mb": max(eng_m["mem"]), "yardstick_mem_mb": max(yard_m["mem"]), **chk}
    log.info("yardstick %s: %.2fx (CPU %.2fx)", label, row["speedup"], row["cpu_speedup"])
    return row


# ------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per configuration (after 1 warm-up)")
    ap.add_argument("--modes", nargs="+", default=["tesla", "tesla+retain", "full-graph", "full-adjoint"])
    ap.add_argument("--paper", action="store_true", help="also measure the paper-sized student (slow on CPU)")
    ap.add_argument("--only-paper", action="store_true", help="skip the quick-student tables")
    ap.add_argument("--paper-image", type=int, default=32)
    ap.add_argument("--paper-iters", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads per worker (1: steadiest on a shared machine; 0: torch's default)")
    ap.add_argument("--out", default=None, help="write the numbers as JSON here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    results: dict[str, Any] = {"version": __version__, "torch": torch.__version__, "device": args.device,
                               "platform": platform.platform(), "threads": args.threads or torch.get_num_threads(),
                               "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="mmdd-bench-") as tmp:
        quick_dir = make_experts(Path(tmp) / "quick", QUICK_STUDENT, n_experts=3, epochs=10)
        common = {"device": args.device, "student": QUICK_STUDENT, "experts": str(quick_dir), "pairs": 50,
                  "batch": 25, "iters": args.iters, "threads": args.threads}
        rows = []
        for steps in ([] if args.only_paper else args.steps):
            for mode in args.modes:
                job = dict(common, kind="engine", mode=mode, steps=steps)
                r, rm = run_job(job), run_job(job, strict_malloc=True)
                rows.append({"mode": mode, "syn_steps": steps, "s_per_iter": _med(r["sec"]),
                             "cpu_s_per_iter": _med(r["cpu"]), "peak_mem_mb": max(rm["mem"])})
                log.info("scaling %-13s P=%-2d %.3f s/it  %.1f MB", mode, steps, rows[-1]["s_per_iter"],
                         rows[-1]["peak_mem_mb"])
        results["scaling"] = rows

        yard_rows = []
        quick_rows = () if args.only_paper else (("quick tesla, recompute (P=4, b=25)", "tesla", 4, 25),
                                          ("quick tesla, retain_graph (lors/ptm-st quick)", "tesla+retain", 4, 25),
                                          ("quick full, graph (mtt-vl quick)", "full-graph", 4, 25))
        for label, mode, steps, batch in quick_rows:
            yard_rows.append(compare(label, dict(common, mode=mode, steps=steps, batch=batch)))
        if args.paper or args.only_paper:
            paper_dir = make_experts(Path(tmp) / "paper", dict(PAPER_STUDENT, image_size=args.paper_image), 1, 10)
            job = {"device": args.device, "student": dict(PAPER_STUDENT, image_size=args.paper_image),
                   "experts": str(paper_dir), "pairs": 8, "batch": 4, "iters": args.paper_iters, "steps": 2,
                   "mode": "tesla", "cache_mb": 0, "threads": args.threads}
            yard_rows.append(compare(f"paper-sized tesla (NFNet-L0 {args.paper_image}px, P=2, b=4)", job))
        results["yardstick"] = yard_rows

    print("\n| mode | syn_steps | s/iter | CPU s/iter | peak memory (MB) |\n|---|---|---|---|---|")
    for r in results["scaling"]:
        print(f"| {r['mode']} | {r['syn_steps']} | {r['s_per_iter']:.3f} | {r['cpu_s_per_iter']:.3f} | "
              f"{r['peak_mem_mb']:.1f} |")
    print("\n| config | engine s/iter | yardstick s/iter | speed-up (wall) | speed-up (CPU) | engine MB | "
          "yardstick MB | grads: f64 engine vs yardstick | f32 error engine / yardstick |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in results["yardstick"]:
        print(f"| {r['config']} | {r['engine_s']:.3f} | {r['yardstick_s']:.3f} | {r['speedup']:.2f}x | "
              f"{r['cpu_speedup']:.2f}x | {r['engine_mem_mb']:.1f} | {r['yardstick_mem_mb']:.1f} | "
              f"{r['f64_engine_vs_yardstick']:.1e} | {r['f32_engine_err']:.1e} / {r['f32_yardstick_err']:.1e} |")
    if args.out:
        write_json(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
