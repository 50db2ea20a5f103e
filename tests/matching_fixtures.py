"""Shared builders for the trajectory-matching tests: a tiny float64 student, synthetic experts, tasks, and
straightforward reference objectives (explicit unroll / detached chain) written independently of the engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from benchmark.experts.store import ExpertCollection, write_expert
from benchmark.interface import Checkpointer, DistillTask, JsonlLogger, TrainData
from benchmark.losses import get_loss
from benchmark.models.student import FlatStudent, StudentConfig, build_student
from methods.matching.config import EngineConfig
from methods.matching.engine import Matcher, StepPlan, SynState, replay_rng
from methods.matching.similarity import make_similarity

@pytest.fixture(autouse=True)
def single_thread():
    """Tiny float64 problems run fastest (and steadiest on a shared machine) on one intra-op thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY_TOWER = {"kind": "convnet", "width": 4, "depth": 1, "norm": "instance", "image_size": 8}
TEXT_DIM = 6


def tiny_student_config(dropout: float = 0.1) -> StudentConfig:
    return StudentConfig(tower="tiny-test", text_dim=TEXT_DIM, head_dropout=dropout, tower_config=dict(TINY_TOWER))


def tiny_flat(dtype=torch.float64, seed: int = 0, dropout: float = 0.1) -> FlatStudent:
    return FlatStudent(build_student(tiny_student_config(dropout), seed=seed).to(dtype))


def random_train(n_images: int = 16, caps: int = 2, seed: int = 0) -> TrainData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, 3, 8, 8, generator=g)
    caption_image = torch.arange(n_images).repeat_interleave(caps)
    texts = torch.randn(len(caption_image), TEXT_DIM, generator=g)
    return TrainData(images, texts, caption_image, [f"c{i}" for i in range(len(caption_image))])


def write_experts(directory: Path, n_experts: int = 2, epochs: int = 4, steps_per_epoch: int = 3,
                  lr: float = 0.5, seed: int = 0) -> ExpertCollection:
    """Experts of the tiny student trained by plain SGD on random pairs, written with the real store format."""
    train = random_train(seed=seed)
    loss = get_loss("ce")
    for k in range(n_experts):
        flat = FlatStudent(build_student(tiny_student_config(), seed=100 + k))
        th = {m: flat.flat(m).clone() for m in ("img", "txt")}
        traj = {m: [th[m].clone()] for m in th}
        g = torch.Generator().manual_seed(1000 + k)
        for _ in range(epochs):
            for _ in range(steps_per_epoch):
                idx = torch.randperm(train.n_pairs, generator=g)[:8]
                x, t = train.pairs(idx)
                ti, tt = th["img"].requires_grad_(), th["txt"].requires_grad_()
                gi, gt = torch.autograd.grad(loss(flat.logits(x, t, ti, tt), None), (ti, tt))
                th = {"img": (ti - lr * gi).detach(), "txt": (tt - lr * gt).detach()}
            for m in th:
                traj[m].append(th[m].clone())
        meta = {"index": k, "config_hash": "tiny-test", "epochs": epochs, "param_names": flat.names,
                "param_shapes": {m: [list(s) for s in flat.shapes[m]] for m in flat.shapes}}
        write_expert(directory / f"expert_{k:03d}.safetensors", traj, meta)
    return ExpertCollection(directory)


def make_task(tmp_path: Path, params: dict[str, Any], budget: int = 8, seed: int = 0, checkpoint_every: int = 0,
              experts: ExpertCollection | None = None, dropout: float = 0.1) -> DistillTask:
    if experts is None:
        exp_dir = tmp_path / "experts"
        experts = ExpertCollection(exp_dir) if exp_dir.exists() else write_experts(exp_dir)
    ck = Checkpointer(tmp_path / "ckpt" if checkpoint_every else None, checkpoint_every)
    return DistillTask(train=random_train(), student=tiny_student_config(dropout), budget=budget, seed=seed,
                       params=params, device="cpu", experts=experts, logger=JsonlLogger(), checkpoint=ck,
                       dataset="tiny-test")


def engine_config(budget: int = 10, **params) -> EngineConfig:
    base = {"dtype": "float64", "syn_steps": 3, "batch_size": 4, "iterations": 1, "lr_init_img": 0.05,
            "lr_init_txt": 0.07}
    base.update(params)
    return EngineConfig.from_params(base, budget)


def random_state(flat, cfg: EngineConfig, n: int, g: torch.Generator, perturb_sim: bool = True):
    """(syn, θ0, θ*) in float64 drawn from ``g``: random synthetic data and S (moved off its init when
    ``perturb_sim``, so every factor gets a gradient), θ0 the student's weights and θ* = θ0 + noise."""
    dt = torch.float64
    sim = make_similarity(cfg.similarity, n, g, "cpu", dt)
    if perturb_sim:
        for v in sim.tensors.values():
            v.add_(0.3 * torch.randn(v.shape, generator=g, dtype=dt))
    syn = SynState(torch.randn(n, 3, 8, 8, generator=g, dtype=dt), torch.randn(n, TEXT_DIM, generator=g, dtype=dt),
                   torch.tensor([cfg.lr_init_img, cfg.lr_init_txt], dtype=dt), sim)
    th0 = {m: flat.flat(m).clone() for m in ("img", "txt")}
    th1 = {m: th0[m] + 0.05 * torch.randn(th0[m].shape, generator=g, dtype=dt) for m in th0}
    return syn, th0, th1


def random_setup(cfg: EngineConfig, n: int = 10, seed: int = 0, dropout: float = 0.1, perturb_sim: bool = True):
    """(matcher, syn, θ0, θ*, plan) with random synthetic data, expert endpoints and a plan whose batches repeat
    indices across steps (b=4 over n=10: permutation slices plus a fresh permutation)."""
    flat = tiny_flat(dropout=dropout)
    matcher = Matcher(flat, cfg, "cpu")
    g = torch.Generator().manual_seed(seed)
    syn, th0, th1 = random_state(flat, cfg, n, g, perturb_sim)
    b = cfg.batch_size or n
    perms = [torch.randperm(n, generator=g) for _ in range(cfg.syn_steps)]
    batches = []
    pos, p = 0, 0
    for _ in range(cfg.syn_steps):
        if pos + b > n:
            p, pos = p + 1, 0
        batches.append(perms[p][pos:pos + b])
        pos += b
    seeds = [int(s) for s in torch.randint(0, 2**62, (cfg.syn_steps,), generator=g)]
    return matcher, syn, th0, th1, StepPlan(0, 0, batches, seeds)


# ---------------------------------------------------------------------------------------------------------------
# reference objectives (autograd on full-size tensors: indexing inside the graph does the scatter)
# ---------------------------------------------------------------------------------------------------------------
def leaves(syn: SynState):
    X = syn.images.clone().requires_grad_()
    T = syn.texts.clone().requires_grad_()
    sim = {k: v.clone().requires_grad_() for k, v in syn.sim.tensors.items()}
    eta = syn.lr.clone().requires_grad_()
    return X, T, sim, eta


def batch_target(syn: SynState, sim: dict[str, torch.Tensor], idx: torch.Tensor):
    kind = syn.sim.kind
    if kind == "none":
        return None
    if kind == "full":
        return sim["sim_full"][idx][:, idx]
    r = sim["sim_l"].shape[1]
    return torch.diag(sim["sim_a"][idx]) + (syn.sim.alpha / r) * sim["sim_l"][idx] @ sim["sim_r"][idx].T


def _loss(matcher: Matcher, th_img, th_txt, X, T, S, idx, seed, replay=True):
    ctx = replay_rng(seed, torch.device("cpu")) if (replay and matcher.dropout == "replay") else _Null()
    with ctx:
        return matcher.inner_loss(th_img, th_txt, X[idx], T[idx], S)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def weights(cfg: EngineConfig, d: dict[str, torch.Tensor]):
    if cfg.normalize == "merged":
        return {m: 1.0 / (d["img"] + d["txt"]) for m in d}
    return {m: 1.0 / d[m] for m in d}


def reference_full(matcher: Matcher, syn: SynState, th0, th1, plan: StepPlan):
    """Autograd through an explicit unroll: returns J and dJ/d(X, T, sim..., η)."""
    cfg = matcher.cfg
    X, T, sim, eta = leaves(syn)
    th = {m: th0[m].clone().requires_grad_() for m in th0}
    for idx, seed in zip(plan.batches, plan.seeds):
        loss = _loss(matcher, th["img"], th["txt"], X, T, batch_target(syn, sim, idx), idx, seed)
        gi, gt = torch.autograd.grad(loss, (th["img"], th["txt"]), create_graph=True)
        th = {"img": th["img"] - eta[0] * gi, "txt": th["txt"] - eta[1] * gt}
    d = {m: (th0[m] - th1[m]).square().sum() for m in th0}
    w = weights(cfg, d)
    J = sum(w[m] * (th[m] - th1[m]).square().sum() for m in th)
    return J, _grads(J, X, T, sim, eta)


def reference_tesla(matcher: Matcher, syn: SynState, th0, th1, plan: StepPlan, lr_grad_separate: bool = False):
    """Autograd of the detached-chain objective J(Z, η) = Σ w_m ‖θ0 − η_m Σ_i g_i(θ̄_i, Z) − θ*‖²."""
    cfg = matcher.cfg
    X, T, sim, eta = leaves(syn)
    eta_bar = [float(v) for v in syn.lr]
    # θ̄_i: the forward chain with η̄, as constants
    bars = []
    th = {m: th0[m].clone() for m in th0}
    for idx, seed in zip(plan.batches, plan.seeds):
        bars.append(th)
        ti, tt = th["img"].clone().requires_grad_(), th["txt"].clone().requires_grad_()
        with torch.no_grad():
            S = batch_target(syn, {k: v.detach() for k, v in sim.items()}, idx)
        loss = _loss(matcher, ti, tt, X.detach(), T.detach(), S, idx, seed)
        gi, gt = torch.autograd.grad(loss, (ti, tt))
        th = {"img": th["img"] - eta_bar[0] * gi, "txt": th["txt"] - eta_bar[1] * gt}
    G = {m: 0 for m in th0}
    for (idx, seed), bar in zip(zip(plan.batches, plan.seeds), bars):
        ti, tt = bar["img"].clone().requires_grad_(), bar["txt"].clone().requires_grad_()
        loss = _loss(matcher, ti, tt, X, T, batch_target(syn, sim, idx), idx, seed)
        gi, gt = torch.autograd.grad(loss, (ti, tt), create_graph=True)
        G = {"img": G["img"] + gi, "txt": G["txt"] + gt}
    d = {m: (th0[m] - th1[m]).square().sum() for m in th0}
    w = weights(cfg, d)
    res = {m: th0[m] - eta[k] * G[m] - th1[m] for k, m in enumerate(("img", "txt"))}
    J = sum(w[m] * res[m].square().sum() for m in res)
    grads = _grads(J, X, T, sim, eta)
    if lr_grad_separate:  # η-gradient with per-tower normalisation (the LoRS variant)
        J2 = sum((1.0 / d[m]) * res[m].square().sum() for m in res)
        grads["lr"] = torch.autograd.grad(J2, eta, retain_graph=True)[0]
    return J, grads


def _grads(J, X, T, sim, eta):
    names = ["images", "texts", *sim.keys(), "lr"]
    out = torch.autograd.grad(J, [X, T, *sim.values(), eta], retain_graph=True, allow_unused=True)
    return {n: (torch.zeros_like(v) if g is None else g)
            for n, g, v in zip(names, out, [X, T, *sim.values(), eta])}


def max_rel_err(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)) for k in b}
