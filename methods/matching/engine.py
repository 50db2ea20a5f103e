"""The trajectory-matching engine: inner loops, their gradients, and the outer loop over phases.

Notation (docs/methods.md#notation): towers m ∈ {img, txt}; θ_0 = expert at start epoch s, θ* = expert at s + E;
inner steps i = 0..P−1 on batches B_i of the synthetic data Z = (X, T, similarity parameters):

    ℓ_i(θ, Z_i) = Loss(s · cos(f_img(X_{B_i}; θ^img), f_txt(T_{B_i}; θ^txt)), S_{B_i}),  g_i = ∇_θ ℓ_i(θ_i, Z_i),
    θ_{i+1}^m = θ_i^m − η_m g_i^m,   D_m = ‖θ_0^m − θ*^m‖²,   w_m = 1/D_m (separate) or 1/Σ_m D_m (merged).

``unroll = "full"`` — objective J = Σ_m w_m ‖θ_P^m − θ*^m‖² with θ_P the unrolled chain, differentiated exactly
(second order, cross-step Hessian terms included) with respect to X, T, the similarity parameters and η:

* ``full_impl = "graph"`` keeps one autograd graph over all P steps (memory grows with P);
* ``full_impl = "adjoint"`` runs a first-order forward pass storing θ_0..θ_{P−1}, then a reverse sweep with
  λ_P = 2 w (θ_P − θ*), and per step i (recomputing its graph): ∂J/∂Z_i = −∂/∂Z_i (Σ_m η_m λ_{i+1}^m · g_i^m),
  ∂J/∂η_m −= λ_{i+1}^m · g_i^m, λ_i = λ_{i+1} − ∂/∂θ_i (Σ_m η_m λ_{i+1}^m · g_i^m). Same gradient, flat memory.

``unroll = "tesla"`` — the detached-chain objective (docs/methods.md#tesla): θ̄_i are the forward pass's iterates treated as
constants, G^m = Σ_i g_i^m(θ̄_i, Z_i), and J = Σ_m w_m ‖θ_0^m − η_m G^m − θ*^m‖². Its exact gradient is
∂J/∂Z_i = ∂/∂Z_i (Σ_m v_m · g_i^m(θ̄_i, Z_i)) with v_m = −2 η_m w_m (θ_0^m − η_m G^m − θ*^m), and
∂J/∂η_m = −2 w_m G^m · (θ_0^m − η_m G^m − θ*^m). Memory: one step's double-backward graph plus P stored θ̄_i.

Batch gradients are computed with respect to batch-sized leaf copies and scatter-added into full-size buffers
(rows B_i of X, T, a, L, R; block [B_i, B_i] of a full S).

``student = heads`` (RepBlend, docs/methods.md#repblend): θ = the two projection heads over a frozen image encoder
f_enc. With ``encoder_grad = accumulate`` the batch leaves of the image side are the features U = f_enc(X) (computed
once per iteration under no_grad); ∂J/∂U is scatter-added into an N × d buffer and turned into ∂J/∂X by one encoder
backward per sample used. ``blend_alpha > 0`` mixes U_B and T_B by the step's M = λI + (1−λ)P inside ℓ_i (never
S_B); the plan stores (λ, π) so both passes replay them. The teacher is the head-only experts that ``mmdd prepare``
built once per dataset (``head-experts`` artifact), read lazily from the task's prepared directory.

Dropout (``inner_dropout``): ``replay`` runs the student in train mode and seeds each inner step's RNG from the
iteration plan, so the recompute pass sees exactly the forward pass's masks; ``off`` runs it in eval mode. The
published TESLA behaviour (fresh masks in the recompute) is ``bug_compat.dropout_resample``.

Cost per iteration (what makes the step fast, see ``benchmark/perf/bench_matching.py``): the student is built once
and run functionally on flat vectors; the teacher reads only epochs s and s+E (memory-mapped, LRU-cached); the first
pass is first order (no graph is built only to be detached) unless ``retain_graph`` keeps each step's gradient graph
for the second pass (no recompute; memory grows with P); the residual is formed as (θ_0 − θ*) − η G — the first
difference is exact in floating point, so float32 keeps the gradient accurate where θ_0 − η G − θ* cancels — and
the vector v is never materialised (coefficient × res · g_i).

Resume: every ``checkpoint.every`` iterations the synthetic tensors, momentum buffers, EMA, the phase's generator
state and sampling streams, the finished phases and the counters are saved atomically (safetensors + JSON, with a
fingerprint of the configuration); a rerun resumes and ends bitwise equal to an uninterrupted run on CPU. Dropout
masks come from per-step seeds drawn from that generator, so no global RNG state needs saving. A NaN/inf loss,
gradient or updated tensor raises :class:`DistillationDiverged` before anything is saved.

Inner learning rates: η is the learnable value itself (so ``lr_lr`` keeps its published meaning) and is clamped to
``≥ lr_min`` after every outer step; the DistilledSet stores the (positive) EMA values.

Timing / memory per iteration: the timer covers plan sampling, the teacher reads, both passes, the outer update and
the EMA — not logging or checkpoint I/O (``teacher_io_s`` is also reported on its own). ``peak_mem_mb``: on CUDA
``max_memory_allocated`` with the peak reset before each step; on CPU the process's peak RSS during the step (VmHWM
after resetting it through ``/proc/self/clear_refs``; where that is not writable, the lifetime ``ru_maxrss``).
``mem_base_mb`` is what was in use when the step started (allocated / RSS), so ``peak − base`` is the step's own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from benchmark.distilled import DistilledSet, Phase
from benchmark.experts.store import TOWERS
from benchmark.interface import DistillTask
from benchmark.losses import get_loss
from benchmark.models.student import FlatStudent
from benchmark.progress import Progress
from benchmark.seeding import derive_seed
from methods.matching.artifacts import head_experts_requirement, shortcut_requirement, trained_head_spec
from methods.matching.blend import Blend, draw_blend
from methods.matching.config import EngineConfig, PhaseSpec
from methods.matching.heads import ENCODE_CHUNK, build_heads_student, open_head_experts
from methods.matching.similarity import Similarity, make_similarity
from methods.matching.teacher import HeadExpertTeacher, Teacher, make_teacher

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class DistillationDiverged(FloatingPointError):
    """The matching loss or a gradient became NaN/inf; the last good checkpoint is kept."""


# ==================================================================================================================
# state of one phase
# ==================================================================================================================
@dataclass
class SynState:
    """The learnable tensors of one phase (no autograd on them: gradients are computed and applied by hand)."""

    images: torch.Tensor
    texts: torch.Tensor
    lr: torch.Tensor  # [2]: η_img, η_txt
    sim: Similarity

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"images": self.images, "texts": self.texts, "lr": self.lr, **self.sim.tensors}

    @staticmethod
    def group(name: str) -> str:
        return "sim" if name.startswith("sim_") else name


@dataclass
class StepPlan:
    """Everything random about one outer iteration."""

    expert: int
    start: int
    batches: list[torch.Tensor]
    seeds: list[int]
    blends: list[Blend] | None = None  # representation blending: (λ, π) per step, replayed by both passes


@dataclass
class StepResult:
    grads: dict[str, torch.Tensor]
    objective: torch.Tensor
    match: dict[str, float]  # per-tower ‖θ_P − θ*‖² / D_m (separate normalisation, for logging)


# ==================================================================================================================
# inner loop and gradients
# ==================================================================================================================
@contextlib.contextmanager
def replay_rng(seed: int, device: torch.device):
    """Run the block with the global RNG seeded to ``seed``; restore the previous state afterwards."""
    if device.type == "cuda":
        with torch.random.fork_rng(devices=[device], device_type="cuda"):
            torch.cuda.manual_seed(seed)
            yield
    elif device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
    else:  # other accelerators: seed everything, restore the CPU stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield


def accurate_dot(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """a·b as a float64 scalar, with float32 inputs summed in chunks (per-chunk BLAS dots, float64 total).

    A plain float32 ``torch.dot`` (or ``vector_norm``) over 33 M entries is off by ~5e-4 relative (measured), and
    that error scales every gradient through D_m = ‖θ_0 − θ*‖²; chunks of 1024 bring it to ~1e-8 at the cost of a
    plain dot, without a temporary of the vectors' size."""
    if a.dtype == torch.float64 or a.numel() <= chunk:
        return torch.dot(a, b).double()
    n = a.numel() - a.numel() % chunk
    head = torch.bmm(a[:n].view(-1, 1, chunk), b[:n].view(-1, chunk, 1)).double().sum()
    return head + torch.dot(a[n:], b[n:]).double()


class Matcher:
    """Computes one iteration's gradients for a fixed student (built once, reused every iteration)."""

    def __init__(self, flat: FlatStudent, cfg: EngineConfig, device: torch.device | str,
                 encoder: torch.nn.Module | None = None):
        self.flat = flat
        self.cfg = cfg
        self.device = torch.device(device)
        self.encoder = encoder  # student = heads: the frozen image encoder in front of θ^img = h_img
        self.accumulate = encoder is not None and cfg.representation.encoder_grad == "accumulate"
        self._feats: torch.Tensor | None = None  # this iteration's encoder features (accumulate)
        if encoder is not None:
            encoder.eval()
            for p in encoder.parameters():
                p.requires_grad_(False)
        self.loss_fn = get_loss(cfg.loss)
        tau = cfg.bug_compat.inner_temperature or (1.0 / flat.logit_scale)
        self.scale = math.log(1.0 / tau) if cfg.bug_compat.mtt_logit_scale else 1.0 / tau
        self.dropout = cfg.inner_dropout
        flat.model.train(self.dropout == "replay")
        for p in flat.model.parameters():
            p.requires_grad_(False)

    # -------------------------------------------------------------------------------------------- building blocks
    def _rng(self, seed: int, replay: bool = True):
        if self.dropout == "off" or not replay:
            return contextlib.nullcontext()
        return replay_rng(seed, self.device)

    def inner_loss(self, th_img: torch.Tensor, th_txt: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                   s: torch.Tensor | None, blend: Blend | None = None) -> torch.Tensor:
        """ℓ(θ) on one batch. With the ``heads`` student, ``x`` are encoder features (``accumulate``) or images
        that go through the frozen encoder here (``per_step``); ``blend`` mixes features and texts, never ``s``."""
        if self.encoder is not None and not self.accumulate:
            x = self.encoder(x)
        if blend is not None:
            x, t = blend.apply(x), blend.apply(t)
        e_img = self.flat.embed_images(x, th_img)
        e_txt = self.flat.embed_texts(t, th_txt)
        return self.loss_fn(self.scale * e_img @ e_txt.T, s)

    def _batch(self, syn: SynState, idx: torch.Tensor, requires_grad: bool):
        source = self._feats if self.accumulate else syn.images
        x = source[idx].requires_grad_(requires_grad)
        t = syn.texts[idx].requires_grad_(requires_grad)
        sim = syn.sim.gather(idx, requires_grad)
        return x, t, sim

    def _weights(self, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.cfg.normalize == "merged":
            tot = d["img"] + d["txt"]
            return {m: 1.0 / tot for m in TOWERS}
        return {m: 1.0 / d[m] for m in TOWERS}

    def _zero_grads(self, syn: SynState) -> dict[str, torch.Tensor]:
        grads = {k: torch.zeros_like(v) for k, v in syn.tensors().items()}
        if self.accumulate:  # ∂J/∂U, N × d, turned into ∂J/∂X by one encoder backward (:meth:`_features_to_images`)
            grads["features"] = torch.zeros_like(self._feats)
        return grads

    @staticmethod
    def _scatter(grads, syn: SynState, idx, x, t, sim, dz: tuple) -> None:
        gx, gt, *gs = dz
        if gx is not None:
            grads["features" if "features" in grads else "images"].index_add_(0, idx, gx)
        if gt is not None:
            grads["texts"].index_add_(0, idx, gt)
        syn.sim.scatter_(grads, idx, dict(zip(sim.keys(), gs)))

    def _forward(self, syn: SynState, th0: dict[str, torch.Tensor], plan: StepPlan, eta: list[float],
                 keep: bool):
        """First pass: θ̄_0..θ̄_{P−1}, θ̄_P (sequential, with η̄), G = Σ g_i. First order, unless ``keep``: then each
        step's gradient is built with a graph (create_graph) and kept for the second pass."""
        th = {m: th0[m] for m in TOWERS}
        thetas, kept = [], []
        G = {m: torch.zeros_like(th0[m]) for m in TOWERS}
        for i, (idx, seed) in enumerate(zip(plan.batches, plan.seeds)):
            ti = th["img"].detach().requires_grad_(True)
            tt = th["txt"].detach().requires_grad_(True)
            x, t, sim = self._batch(syn, idx, requires_grad=keep)
            with self._rng(seed):
                loss = self.inner_loss(ti, tt, x, t, syn.sim.batch_matrix(sim), self._blend(plan, i))
            gi, gt = torch.autograd.grad(loss, (ti, tt), create_graph=keep)
            thetas.append(th)
            kept.append((gi, gt, ti, tt, x, t, sim) if keep else None)
            with torch.no_grad():
                th = {"img": torch.add(th["img"], gi, alpha=-eta[0]), "txt": torch.add(th["txt"], gt, alpha=-eta[1])}
                G["img"].add_(gi)
                G["txt"].add_(gt)
        return thetas, th, G, kept

    def _step_graph(self, syn, thetas, kept, i, plan, replay=True):
        """Step i's gradient as a differentiable function of (θ_i, Z_i): (g_img, g_txt, θ leaves, x, t, sim leaves),
        from the first pass when kept, else recomputed (same dropout masks unless ``replay`` is off)."""
        if kept[i] is not None:
            out, kept[i] = kept[i], None
            return out
        ti = thetas[i]["img"].detach().requires_grad_(True)
        tt = thetas[i]["txt"].detach().requires_grad_(True)
        x, t, sim = self._batch(syn, plan.batches[i], requires_grad=True)
        with self._rng(plan.seeds[i], replay):
            loss = self.inner_loss(ti, tt, x, t, syn.sim.batch_matrix(sim), self._blend(plan, i))
        gi, gt = torch.autograd.grad(loss, (ti, tt), create_graph=True)
        return gi, gt, ti, tt, x, t, sim

    # -------------------------------------------------------------------------------------------- the three modes
    def step(self, syn: SynState, th0: dict[str, torch.Tensor], th1: dict[str, torch.Tensor],
             plan: StepPlan) -> StepResult:
        """Gradients of this iteration's objective (see the module docstring) for the given plan."""
        if any(b.device != self.device for b in plan.batches):
            plan = dataclasses.replace(plan, batches=[b.to(self.device) for b in plan.batches])
        if self.accumulate:
            self._feats = self._features(syn, plan)
        if self.cfg.unroll == "tesla":
            res = self.tesla(syn, th0, th1, plan)
        elif self.cfg.full_impl == "adjoint":
            res = self.full_adjoint(syn, th0, th1, plan)
        else:
            res = self.full_graph(syn, th0, th1, plan)
        if self.accumulate:
            self._features_to_images(res.grads, syn, plan)
            self._feats = None
        return res

    # -------------------------------------------------------------------------------------------- heads student
    @staticmethod
    def _blend(plan: StepPlan, i: int) -> Blend | None:
        return None if plan.blends is None else plan.blends[i]

    @staticmethod
    def _used(plan: StepPlan) -> torch.Tensor:
        return torch.unique(torch.cat(plan.batches))

    def _features(self, syn: SynState, plan: StepPlan) -> torch.Tensor:
        """U = f_enc(X) of every sample this iteration uses, under no_grad (X and f_enc are fixed within it);
        rows of unused samples stay 0 and are never read."""
        used = self._used(plan)
        with torch.no_grad():
            chunks = [self.encoder(syn.images[used[s:s + ENCODE_CHUNK]]) for s in range(0, used.numel(), ENCODE_CHUNK)]
        feats = chunks[0].new_zeros(syn.images.shape[0], chunks[0].shape[1])
        feats[used] = torch.cat(chunks)
        return feats

    def _features_to_images(self, grads: dict[str, torch.Tensor], syn: SynState, plan: StepPlan) -> None:
        """∂J/∂X = (∂U/∂X)ᵀ ∂J/∂U with ∂J/∂U summed over all steps: ONE encoder backward per sample used (first
        order through the frozen encoder, whose weights get no gradient)."""
        gu = grads.pop("features")
        used = self._used(plan)
        for s in range(0, used.numel(), ENCODE_CHUNK):
            rows = used[s:s + ENCODE_CHUNK]
            x = syn.images[rows].detach().requires_grad_(True)
            (gx,) = torch.autograd.grad(self.encoder(x), x, gu[rows])
            grads["images"].index_add_(0, rows, gx)

    @staticmethod
    def _sqdist(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]):
        """(a − b per tower, ‖a − b‖² per tower) with one temporary per tower."""
        diff = {m: a[m] - b[m] for m in TOWERS}
        return diff, {m: accurate_dot(diff[m], diff[m]) for m in TOWERS}

    def tesla(self, syn, th0, th1, plan) -> StepResult:
        eta = [float(v) for v in syn.lr]
        keep = self.cfg.retain_graph and not self.cfg.bug_compat.dropout_resample
        thetas, _, G, kept = self._forward(syn, th0, plan, eta, keep)
        res, d = self._sqdist(th0, th1)
        w = self._weights(d)
        for k, m in enumerate(TOWERS):  # res = θ0 − η G − θ*, in place of θ0 − θ*
            res[m].add_(G[m], alpha=-eta[k])
        rr = {m: accurate_dot(res[m], res[m]) for m in TOWERS}
        objective = sum(w[m] * rr[m] for m in TOWERS)
        # ∂J/∂g_i^m = v_m = coef_m · res_m with coef_m = −2 η_m w_m (the vector v is never materialised)
        coef = {m: float((-2.0 * eta[k]) * w[m]) for k, m in enumerate(TOWERS)}
        grads = self._zero_grads(syn)
        w_lr = {m: 1.0 / d[m] for m in TOWERS} if self.cfg.bug_compat.lr_grad_separate_norm else w
        grads["lr"] = torch.stack([-2.0 * w_lr[m] * accurate_dot(G[m], res[m]) for m in TOWERS]).to(syn.lr.dtype)
        del G
        replay = not self.cfg.bug_compat.dropout_resample
        for i in range(len(plan.batches)):
            gi, gt, ti, tt, x, t, sim = self._step_graph(syn, thetas, kept, i, plan, replay)
            s = coef["img"] * torch.dot(res["img"], gi) + coef["txt"] * torch.dot(res["txt"], gt)
            dz = torch.autograd.grad(s, (x, t, *sim.values()), allow_unused=True)
            self._scatter(grads, syn, plan.batches[i], x, t, sim, dz)
            thetas[i] = None
            del gi, gt, s, dz
        return StepResult(grads, objective.detach(), {m: float(rr[m] / d[m]) for m in TOWERS})

    def full_adjoint(self, syn, th0, th1, plan) -> StepResult:
        eta = [float(v) for v in syn.lr]
        thetas, thP, _, kept = self._forward(syn, th0, plan, eta, self.cfg.retain_graph)
        _, d = self._sqdist(th0, th1)
        w = self._weights(d)
        lam = {m: thP[m].sub_(th1[m]) for m in TOWERS}  # θ_P − θ*, in place (θ_P is not needed any more)
        rr = {m: accurate_dot(lam[m], lam[m]) for m in TOWERS}
        objective = sum(w[m] * rr[m] for m in TOWERS)
        for m in TOWERS:
            lam[m].mul_(float(2.0 * w[m]))  # λ_P = 2 w (θ_P − θ*)
        grads = self._zero_grads(syn)
        dlr = torch.zeros(2, dtype=torch.float64, device=syn.lr.device)
        for i in reversed(range(len(plan.batches))):
            gi, gt, ti, tt, x, t, sim = self._step_graph(syn, thetas, kept, i, plan)
            dlr[0] -= accurate_dot(lam["img"], gi.detach())
            dlr[1] -= accurate_dot(lam["txt"], gt.detach())
            s = eta[0] * torch.dot(lam["img"], gi) + eta[1] * torch.dot(lam["txt"], gt)
            inputs = (x, t, *sim.values()) + ((ti, tt) if i > 0 else ())
            out = torch.autograd.grad(s, inputs, allow_unused=True)
            nz = 2 + len(sim)
            dz = tuple(None if g is None else -g for g in out[:nz])
            self._scatter(grads, syn, plan.batches[i], x, t, sim, dz)
            if i > 0:  # λ_i = λ_{i+1} − ∂s/∂θ_i (the graph of s is consumed, so in place is safe)
                lam["img"].sub_(out[nz])
                lam["txt"].sub_(out[nz + 1])
            thetas[i] = None
            del gi, gt, s, out, dz
        grads["lr"] = dlr.to(syn.lr.dtype)
        return StepResult(grads, objective.detach(), {m: float(rr[m] / d[m]) for m in TOWERS})

    def full_graph(self, syn, th0, th1, plan) -> StepResult:
        eta_t = syn.lr.detach().clone().requires_grad_(True)
        th = {m: th0[m].detach().requires_grad_(True) for m in TOWERS}
        leaves = []
        for i, (idx, seed) in enumerate(zip(plan.batches, plan.seeds)):
            x, t, sim = self._batch(syn, idx, requires_grad=True)
            with self._rng(seed):
                loss = self.inner_loss(th["img"], th["txt"], x, t, syn.sim.batch_matrix(sim), self._blend(plan, i))
            gi, gt = torch.autograd.grad(loss, (th["img"], th["txt"]), create_graph=True)
            th = {"img": th["img"] - eta_t[0] * gi, "txt": th["txt"] - eta_t[1] * gt}
            leaves.append((idx, x, t, sim))
        _, d = self._sqdist(th0, th1)
        w = self._weights(d)
        res = {m: th[m] - th1[m] for m in TOWERS}
        objective = sum(w[m] * res[m].square().sum() for m in TOWERS)
        inputs = [z for _, x, t, sim in leaves for z in (x, t, *sim.values())] + [eta_t]
        out = list(torch.autograd.grad(objective, inputs, allow_unused=True))
        grads = self._zero_grads(syn)
        pos = 0
        for idx, x, t, sim in leaves:
            n = 2 + len(sim)
            self._scatter(grads, syn, idx, x, t, sim, tuple(out[pos:pos + n]))
            pos += n
        grads["lr"] = out[-1] if out[-1] is not None else torch.zeros_like(syn.lr)
        return StepResult(grads, objective.detach(),
                          {m: float(res[m].detach().square().sum() / d[m]) for m in TOWERS})


# ==================================================================================================================
# outer-loop pieces: plan sampling, optimiser, EMA, meters
# ==================================================================================================================
class PlanSampler:
    """Random streams of one phase, all from one CPU generator: expert order (a shuffled list, reshuffled when
    exhausted), start epochs, inner batches (consecutive slices of a permutation; leftovers skipped), dropout seeds."""

    def __init__(self, gen: torch.Generator, n_pairs: int, batch: int, n_experts: int, window: tuple[int, int],
                 steps: int, blend_alpha: float = 0.0):
        self.gen, self.n, self.b, self.k, self.window, self.steps = gen, n_pairs, batch, n_experts, window, steps
        self.blend_alpha = float(blend_alpha)
        self.batch_perm = torch.empty(0, dtype=torch.long)
        self.batch_pos = 0
        self.expert_perm = torch.empty(0, dtype=torch.long)
        self.expert_pos = 0

    def _next_batch(self) -> torch.Tensor:
        if self.batch_pos + self.b > self.batch_perm.numel():
            self.batch_perm = torch.randperm(self.n, generator=self.gen)
            self.batch_pos = 0
        out = self.batch_perm[self.batch_pos:self.batch_pos + self.b]
        self.batch_pos += self.b
        return out

    def next(self) -> StepPlan:
        if self.expert_pos >= self.expert_perm.numel():
            self.expert_perm = torch.randperm(self.k, generator=self.gen)
            self.expert_pos = 0
        k = int(self.expert_perm[self.expert_pos])
        self.expert_pos += 1
        start = int(torch.randint(self.window[0], self.window[1], (1,), generator=self.gen))
        batches = [self._next_batch() for _ in range(self.steps)]
        seeds = [int(s) for s in torch.randint(0, 2**62, (self.steps,), generator=self.gen)]
        blends = None  # α_b ≤ 0: nothing is drawn, so the other streams are those of an engine without blending
        if self.blend_alpha > 0:
            blends = [draw_blend(self.gen, int(b.numel()), self.blend_alpha) for b in batches]
        return StepPlan(k, start, batches, seeds, blends)

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return ({"gen": self.gen.get_state(), "batch_perm": self.batch_perm, "expert_perm": self.expert_perm},
                {"batch_pos": self.batch_pos, "expert_pos": self.expert_pos})

    def load(self, tensors: dict[str, torch.Tensor], ints: dict[str, int]) -> None:
        self.gen.set_state(tensors["gen"])
        self.batch_perm, self.expert_perm = tensors["batch_perm"].long(), tensors["expert_perm"].long()
        self.batch_pos, self.expert_pos = int(ints["batch_pos"]), int(ints["expert_pos"])


class MomentumSGD:
    """SGD with momentum per parameter group (buf ← μ·buf + g; p ← p − lr·buf; buffers start at 0, which equals
    torch.optim.SGD without dampening or Nesterov)."""

    def __init__(self, groups: dict[str, tuple[float, float]], params: dict[str, torch.Tensor]):
        self.groups = groups
        self.buffers = {k: torch.zeros_like(v) for k, v in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            lr, mu = self.groups[SynState.group(k)]
            buf = self.buffers[k]
            buf.mul_(mu).add_(grads[k])
            p.sub_(lr * buf)


class EMA:
    """ema ← d·ema + (1 − d)·current after every outer step, initialised to the initial values (no bias
    correction, docs/methods.md#ema); d = 0 keeps a copy of the current values."""

    def __init__(self, decay: float, tensors: dict[str, torch.Tensor]):
        self.decay = float(decay)
        self.tensors = {k: v.detach().clone() for k, v in tensors.items()}

    @torch.no_grad()
    def update(self, current: dict[str, torch.Tensor]) -> None:
        for k, e in self.tensors.items():
            if self.decay == 0.0:
                e.copy_(current[k])
            else:
                e.mul_(self.decay).add_(current[k], alpha=1.0 - self.decay)


class StepMeter:
    """Wall time and peak memory of one step (see the module docstring for what is measured)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._clear_refs = Path("/proc/self/clear_refs")
        self.cpu_mode = "vmhwm"
        try:
            self._reset_hwm()
        except OSError:
            self.cpu_mode = "ru_maxrss"

    def _reset_hwm(self) -> None:
        with self._clear_refs.open("w") as f:
            f.write("5")

    @staticmethod
    def _vmhwm_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")

    @staticmethod
    def _vmrss_mb() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
        return float("nan")

    def start(self) -> None:
        """Reset the peak counter; :attr:`base_mb` is the memory in use when the step starts."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            if self.cpu_mode == "vmhwm":
                try:
                    self._reset_hwm()
                except OSError:
                    self.cpu_mode = "ru_maxrss"
            try:
                self.base_mb = self._vmrss_mb()
            except OSError:
                self.base_mb = float("nan")
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.cpu_mode == "vmhwm":
            peak = self._vmhwm_mb()
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        return dt, peak


def _finite(res: StepResult) -> bool:
    if not bool(torch.isfinite(res.objective)):
        return False
    return all(bool(torch.isfinite(g).all()) for g in res.grads.values())


# ==================================================================================================================
# the engine
# ==================================================================================================================
class MatchingEngine:
    """Runs the phases of an :class:`EngineConfig` on a :class:`DistillTask` and returns the EMA'd DistilledSet.

    ``callbacks`` (tests, diagnostics) are called as ``cb(engine, phase_index, iteration, syn)`` after every outer
    update; raising from one aborts the run like a kill would."""

    def __init__(self, task: DistillTask, cfg: EngineConfig, method: str,
                 callbacks: Iterable[Callable[..., None]] = ()):
        self.task, self.cfg, self.method = task, cfg, method
        self.callbacks = list(callbacks)
        self.device = torch.device(task.device)
        self.dtype = DTYPES[cfg.dtype]
        self.heads = cfg.representation.student == "heads"
        encoder = None
        if self.heads:
            heads = build_heads_student(task, cfg.representation, method, derive_seed(task.seed, method, "student"))
            self.experts = open_head_experts(task.prepared_dir(head_experts_requirement(cfg)), trained_head_spec(cfg),
                                             heads.source, method)
            encoder = heads.encoder.to(self.device, self.dtype)
            model = heads.model.to(self.device, self.dtype)
        else:
            self.experts = task.require_experts(method)
            model = task.make_student(seed=derive_seed(task.seed, method, "student")).to(self.dtype)
        self.flat = FlatStudent(model)
        self.matcher = Matcher(self.flat, cfg, self.device, encoder)
        self.image_size = int(getattr(model, "image_size", 0))
        self._layer_numels = {m: list(self.flat.numels[m]) for m in TOWERS}
        self.stats: dict[str, Any] = {"sec_per_iter": [], "peak_mem_mb": [], "teacher_io_s": 0.0}

    # ------------------------------------------------------------------------------------------------ provenance
    def fingerprint(self) -> str:
        doc = {"method": self.method, "engine": self.cfg.to_json(), "seed": self.task.seed, "budget": self.task.budget,
               "student": {k: v for k, v in dataclasses.asdict(self.task.student).items()},
               "experts": [self.experts.meta.get("config_hash"), len(self.experts)],
               "train_pairs": self.task.train.n_pairs}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------------------------------------ setup
    def _teacher(self, k: int, spec: PhaseSpec) -> Teacher:
        if self.heads:
            teacher: Teacher = HeadExpertTeacher(self.experts, self.cfg.teacher_cache_mb)
        else:
            root = None
            if spec.teacher.kind == "shortcut":
                root = self.task.prepared_dir(shortcut_requirement(spec.teacher))
            teacher = make_teacher(spec.teacher, self.experts, root, self.cfg.teacher_cache_mb, self._layer_numels)
        teacher.check_window(spec.min_start, spec.max_start, self.cfg.expert_epochs, f"phases[{k}]")
        for m in TOWERS:
            have, want = teacher.numel(m), self.flat.numel(m)
            if have != want:
                fix = "mmdd prepare" if self.heads else "mmdd experts"
                raise ValueError(f"expert trajectories in {self.experts.directory} have {have} {m} parameters but the "
                                 f"task's student has {want}: rerun `{fix}` for this student config "
                                 f"(tower {self.task.student.tower!r}, text_dim {self.task.student.text_dim})")
        return teacher

    def _init_phase(self, k: int, spec: PhaseSpec, gen: torch.Generator) -> tuple[SynState, list[int]]:
        train = self.task.train
        if spec.pairs > train.n_pairs:
            raise ValueError(f"phase {k} wants {spec.pairs} pairs but the training split has {train.n_pairs}: "
                             "lower the budget")
        idx = torch.randperm(train.n_pairs, generator=gen)[:spec.pairs]
        images, texts = train.pairs(idx)
        if self.image_size and images.shape[-1] != self.image_size:
            raise ValueError(f"training images are {list(images.shape[1:])} but the student expects "
                             f"{self.image_size}px: prepare the dataset at the student's image size")
        if texts.shape[1] != self.task.student.text_dim:
            raise ValueError(f"caption features are {texts.shape[1]}-d but student.text_dim is "
                             f"{self.task.student.text_dim}")
        sim = make_similarity(self.cfg.similarity, spec.pairs, gen, self.device, self.dtype, spec.sim_rank)
        lr = torch.tensor([self.cfg.lr_init_img, self.cfg.lr_init_txt], dtype=self.dtype, device=self.device)
        syn = SynState(images.to(self.device, self.dtype).clone(), texts.to(self.device, self.dtype).clone(), lr, sim)
        return syn, [int(i) for i in idx]

    def _optimizer(self, syn: SynState) -> MomentumSGD:
        c = self.cfg
        groups = {"images": (c.lr_img, c.momentum), "texts": (c.lr_txt, c.momentum), "lr": (c.lr_lr, c.momentum_lr),
                  "sim": (c.lr_sim, c.momentum_sim)}
        return MomentumSGD(groups, syn.tensors())

    # ------------------------------------------------------------------------------------------------ checkpoint
    def _save(self, k, it, global_it, syn, opt, ema, sampler, done_tensors, done_meta) -> None:
        ck = self.task.checkpoint
        tensors = dict(done_tensors)
        tensors.update({f"syn.{n}": v for n, v in syn.tensors().items()})
        tensors.update({f"mom.{n}": v for n, v in opt.buffers.items()})
        tensors.update({f"ema.{n}": v for n, v in ema.tensors.items()})
        st, ints = sampler.state()
        tensors.update({f"sampler.{n}": v for n, v in st.items()})
        state = {"fingerprint": self.fingerprint(), "phase": k, "phase_iteration": it, "iteration": global_it,
                 "sampler": ints, "done": done_meta,
                 "stats": {"sec_per_iter": self.stats["sec_per_iter"], "peak_mem_mb": self.stats["peak_mem_mb"]}}
        ck.save(tensors, state)

    def _load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        ck = self.task.checkpoint
        if not ck.enabled:
            return None
        got = ck.load()
        if got is None:
            return None
        tensors, state = got
        if state.get("fingerprint") != self.fingerprint():
            log.warning("checkpoint in %s belongs to another configuration (fingerprint %s, this run %s); starting "
                        "over", ck.directory, state.get("fingerprint"), self.fingerprint())
            return None
        log.info("resuming %s from phase %d, iteration %d", self.method, state["phase"], state["phase_iteration"])
        return tensors, state

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> DistilledSet:
        cfg, task = self.cfg, self.task
        resume = self._load()
        done_tensors: dict[str, torch.Tensor] = {}
        done_meta: list[dict[str, Any]] = []
        first_phase, global_it = 0, 0
        if resume is not None:
            tensors, state = resume
            first_phase, global_it = int(state["phase"]), int(state["iteration"])
            done_meta = list(state["done"])
            done_tensors = {n: v for n, v in tensors.items() if n.startswith("done")}
            self.stats["sec_per_iter"] = list(state["stats"]["sec_per_iter"])
            self.stats["peak_mem_mb"] = list(state["stats"]["peak_mem_mb"])
        if hasattr(task.logger, "truncate"):
            task.logger.truncate(global_it)  # the log is part of the resumed state: no lost or repeated iterations
        teachers = []
        for k, spec in enumerate(cfg.phases):
            teacher = self._teacher(k, spec)
            teachers.append(teacher)
            if k < first_phase:
                continue
            phase_resume = resume if (resume is not None and k == first_phase) else None
            global_it = self._run_phase(k, spec, teacher, phase_resume, global_it, done_tensors, done_meta)
        phases = []
        for k, (spec, meta) in enumerate(zip(cfg.phases, done_meta)):
            t = {n.split(".", 1)[1]: v for n, v in done_tensors.items() if n.startswith(f"done{k}.")}
            lr = t.pop("lr")
            sim_kind = cfg.similarity.kind
            fields = {"similarity": sim_kind, "sim_alpha": float(cfg.similarity.alpha)}
            fields.update({n: v.to("cpu", torch.float32).contiguous() for n, v in t.items() if n.startswith("sim_")})
            phases.append(Phase(images=t["images"].to("cpu", torch.float32).contiguous(),
                                texts=t["texts"].to("cpu", torch.float32).contiguous(),
                                lr_img=float(lr[0]), lr_txt=float(lr[1]), **fields))
        sec = self.stats["sec_per_iter"]
        meta = {
            "method": self.method, "params": task.params, "engine": cfg.to_json(),
            "seed": task.seed,
            "budget": task.budget, "dataset": task.dataset,
            "student": dataclasses.asdict(task.student),
            "teacher": [dict(t.describe(), start_window=[s.min_start, s.max_start], expert_epochs=cfg.expert_epochs)
                        for t, s in zip(teachers, cfg.phases)],
            "phases": done_meta,
            "saved": "ema" if any(s.ema_decay > 0 for s in cfg.phases) else "final",
            "stats": {"iterations": len(sec), "teacher_bytes_read": sum(t.bytes_read for t in teachers)},
            # measurements of this run (the harness keeps them out of the hashed outputs)
            "volatile": {"sec_per_iter_mean": (sum(sec) / len(sec)) if sec else None,
                         "peak_mem_mb_max": max(self.stats["peak_mem_mb"], default=None),
                         "teacher_io_s": self.stats["teacher_io_s"]},
        }
        out = DistilledSet(phases, meta, loss=cfg.loss)
        out.validate(budget=task.budget)
        return out

    def _diverged(self, k: int, it: int, what: str, objective: float, syn: SynState) -> None:
        ck = self.task.checkpoint
        keep = (f"the last good checkpoint is kept in {ck.directory}; " if ck.enabled
                else "checkpoints were off (set checkpoint_every); ")
        raise DistillationDiverged(
            f"{self.method}: {what} became NaN/inf at phase {k}, iteration {it + 1} (objective {objective:.4g}, "
            f"lr_img={float(syn.lr[0]):.4g}, lr_txt={float(syn.lr[1]):.4g}); {keep}lower lr_img/lr_txt/lr_lr/"
            "lr_sim (or syn_steps) and rerun")

    def _run_phase(self, k, spec: PhaseSpec, teacher: Teacher, resume, global_it, done_tensors, done_meta) -> int:
        cfg, task = self.cfg, self.task
        gen = torch.Generator().manual_seed(derive_seed(task.seed, self.method, "phase", k))
        syn, init_idx = self._init_phase(k, spec, gen)
        batch = cfg.batch_size or spec.pairs
        sampler = PlanSampler(gen, spec.pairs, batch, len(teacher), (spec.min_start, spec.max_start), cfg.syn_steps,
                              cfg.representation.blend_alpha)
        opt = self._optimizer(syn)
        ema = EMA(spec.ema_decay, syn.tensors())
        start_it = 0
        if resume is not None:
            tensors, state = resume
            start_it = int(state["phase_iteration"])
            with torch.no_grad():
                for n, v in syn.tensors().items():
                    v.copy_(tensors[f"syn.{n}"])
                for n, v in opt.buffers.items():
                    v.copy_(tensors[f"mom.{n}"])
                for n, v in ema.tensors.items():
                    v.copy_(tensors[f"ema.{n}"])
            sampler.load({n.split(".", 1)[1]: v for n, v in tensors.items() if n.startswith("sampler.")},
                         state["sampler"])
        meter = StepMeter(self.device)
        bar = Progress(spec.iterations, f"{self.method} phase {k + 1}/{len(cfg.phases)}", initial=start_it)
        for it in range(start_it, spec.iterations):
            meter.start()
            plan = sampler.next()
            t_io = time.perf_counter()
            th0, th1 = teacher.endpoints(plan.expert, plan.start, cfg.expert_epochs, self.device, self.dtype)
            io_s = time.perf_counter() - t_io
            res = self.matcher.step(syn, th0, th1, plan)
            if not _finite(res):
                self._diverged(k, it, "the matching loss or its gradient", float(res.objective), syn)
            opt.step(syn.tensors(), res.grads)
            with torch.no_grad():
                syn.lr.clamp_(min=cfg.lr_min)
            if not all(bool(torch.isfinite(v).all()) for v in syn.tensors().values()):
                self._diverged(k, it, "the synthetic data after the update", float(res.objective), syn)
            ema.update(syn.tensors())
            dt, peak = meter.stop()
            global_it += 1
            self.stats["sec_per_iter"].append(dt)
            self.stats["peak_mem_mb"].append(peak)
            self.stats["teacher_io_s"] += io_s
            task.logger.log({"match_loss": float(res.objective), "match_loss_img": res.match["img"],
                             "match_loss_txt": res.match["txt"], "lr_img": float(syn.lr[0]),
                             "lr_txt": float(syn.lr[1]), "sec_per_iter": dt, "teacher_io_s": io_s,
                             "peak_mem_mb": peak, "mem_base_mb": meter.base_mb, "phase": k,
                             "start_epoch": plan.start, "expert": plan.expert},
                            step=global_it)
            bar.update(loss=f"{float(res.objective):.4f}")
            for cb in self.callbacks:
                cb(self, k, it + 1, syn)
            if task.checkpoint.due(global_it):
                done_now = done_meta + []  # the current phase is not done yet
                self._save(k, it + 1, global_it, syn, opt, ema, sampler, done_tensors, done_now)
        bar.close()
        for n, v in ema.tensors.items():
            done_tensors[f"done{k}.{n}"] = v.detach().clone()
        done_meta.append({"phase": k, "pairs": spec.pairs, "teacher": str(spec.teacher),
                          "start_window": [spec.min_start, spec.max_start], "iterations": spec.iterations,
                          "ema_decay": spec.ema_decay, "init_pairs": init_idx,
                          "lr_img_raw": float(syn.lr[0]), "lr_txt_raw": float(syn.lr[1])})
        return global_it
