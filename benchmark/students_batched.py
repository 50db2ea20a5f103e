"""Several evaluation students of one DistilledSet trained as one vectorised model (``torch.func.vmap``), equal to
training them one by one with :func:`benchmark.evaluation.train_student` (docs/protocols.md#batched-students).

The K students' parameters and buffers are stacked on a leading axis and one ``vmap``-ed forward computes the K
losses; the backward of their sum gives each student exactly its own gradient (the students share nothing), and
one ``torch.optim.SGD`` over the stacked tensors applies the same element-wise update as K optimisers would. What
each student sees is its own, as in the sequential path:

* its initialisation (``build_student(seed=s_k)``) and its batch order (a generator seeded with ``s_k``);
* its dropout masks: the sequential path draws them from the global generator seeded with ``s_k``
  (:func:`benchmark.seeding.seeded`); here every dropout layer with p > 0 is replaced by one that multiplies by a
  mask drawn, in the forward's call order, from a per-student generator seeded with ``s_k`` — the same draws
  (``bernoulli_(1 − p)`` then ``÷ (1 − p)``, bit-for-bit on CPU, tested). Masks are drawn on the CPU and moved to
  the device, so a batched run's masks do not depend on the device (a sequential CUDA run uses CUDA's own dropout
  kernel and stream: same distribution, other masks).

Equality is up to floating-point rounding: a vmapped convolution is a grouped convolution, whose sums run in
another order (``tests/test_students_batched.py`` checks metrics and weights in float64). Whether it pays depends on
the device: on this project's CPUs it is slower (grouped convolutions; ``python -m benchmark.perf.bench_throughput``),
so :func:`use_batched` picks it for CUDA only.
"""

from __future__ import annotations

import copy
import functools
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from benchmark.distilled import DistilledSet
from benchmark.evaluation import EvalConfig, Schedule, Selection, SplitData, by_protocol, schedule, student_seeds
from benchmark.losses import get_loss
from benchmark.models.student import DualEncoder, StudentConfig, build_student
from benchmark.progress import Progress
from benchmark.training import SGDConfig, index_batches, make_optimizer

MODES = ("auto", "batched", "sequential")


def use_batched(mode: str, device: torch.device | str, students: int) -> bool:
    """Whether to train the students batched: ``auto`` batches on CUDA (small kernels, launch-bound) and not on the
    CPU (measured slower there); one student is never batched."""
    if mode not in MODES:
        raise ValueError(f"students mode must be one of {MODES}, got {mode!r}")
    if students < 2 or mode == "sequential":
        return False
    return mode == "batched" or torch.device(device).type == "cuda"


class _ReplayDropout(nn.Module):
    """Dropout whose mask is given (``mask`` = Bernoulli(1 − p) / (1 − p), set around each call)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            raise RuntimeError("replayed dropout called without a mask")
        return x * self.mask


def _replace_dropout(module: nn.Module) -> list[_ReplayDropout]:
    """Swap every ``nn.Dropout`` with p > 0 in ``module`` for a :class:`_ReplayDropout`; returns them."""
    out = []
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Dropout) and child.p > 0:
            rep = _ReplayDropout(child.p)
            setattr(module, name, rep)
            out.append(rep)
        else:
            out += _replace_dropout(child)
    return out


class StudentStack:
    """K students of one architecture as stacked tensors, trained together; ``seeds[k]`` seeds the generator of
    student k's dropout masks, as :func:`benchmark.seeding.seeded` seeds the global one in the sequential path."""

    def __init__(self, models: list[DualEncoder], seeds: list[int]):
        if len(models) != len(seeds) or not models:
            raise ValueError("StudentStack needs one seed per model and at least one model")
        self.models = models
        self.device = next(models[0].parameters()).device
        self.dtype = next(models[0].parameters()).dtype
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base.train()
        self.dropouts = _replace_dropout(self.base)
        self.params, self.buffers = stack_module_state(models)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self._shapes: dict[tuple, list[torch.Size]] = {}

    def __len__(self) -> int:
        return len(self.models)

    # ------------------------------------------------------------------------------------------------ optimiser
    def optimizer(self, sgd: SGDConfig) -> torch.optim.SGD:
        """:func:`benchmark.training.make_optimizer`'s two groups (image tower, text head) over the stacked tensors."""
        groups: dict[str, list[torch.Tensor]] = {"image_encoder": [], "text_projection": []}
        for name, p in self.params.items():
            groups[name.split(".", 1)[0]].append(p)
        towers = SimpleNamespace(**{k: SimpleNamespace(parameters=lambda v=v: v) for k, v in groups.items()})
        return make_optimizer(towers, sgd)  # type: ignore[arg-type]

    # ------------------------------------------------------------------------------------------------ dropout
    def _mask_shapes(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Size]:
        """Input shape of each replayed dropout call, in call order (from one forward on the meta device)."""
        key = (tuple(x.shape), tuple(t.shape))
        if key not in self._shapes:
            shapes: list[torch.Size] = []
            hooks = [d.register_forward_pre_hook(lambda mod, inp: shapes.append(inp[0].shape)) for d in self.dropouts]
            for d in self.dropouts:
                d.mask = torch.ones((), device="meta")
            try:
                with torch.no_grad():
                    self.base(x.to("meta"), t.to("meta"))
            finally:
                for h in hooks:
                    h.remove()
                for d in self.dropouts:
                    d.mask = None
            self._shapes[key] = shapes
        return self._shapes[key]

    def _masks(self, x: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
        """[K, *shape] per dropout call: student k's masks from its own generator, in the sequential draw order."""
        shapes = self._mask_shapes(x, t)
        if len(shapes) != len(self.dropouts):
            raise RuntimeError("a replayed dropout layer ran more or less than once per forward; batched students "
                               "support towers that call each dropout layer once (use students: sequential)")
        per_student = []
        for g in self.generators:
            ms = []
            for shape, d in zip(shapes, self.dropouts):
                m = torch.empty(shape, dtype=self.dtype).bernoulli_(1 - d.p, generator=g)
                ms.append(m.div_(1 - d.p))
            per_student.append(ms)
        return [torch.stack([ms[i] for ms in per_student]).to(self.device) for i in range(len(shapes))]

    # ------------------------------------------------------------------------------------------------ step
    def _loss(self, loss_fn, params, buffers, masks, x, t, s):
        for d, m in zip(self.dropouts, masks):
            d.mask = m
        try:
            logits = functional_call(self.base, (params, buffers), (x, t))
        finally:
            for d in self.dropouts:
                d.mask = None
        return loss_fn(logits, s)

    def step(self, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None,
             loss: str) -> None:
        """One optimiser step of every student on its own batch (``x``: [K, B, ...], ``t``: [K, B, d], ``s``:
        [K, B, B] or None), as :func:`benchmark.training.contrastive_step` per student."""
        masks = self._masks(x[0], t[0])
        in_dims = (0, 0, 0, 0, 0, None if s is None else 0)  # no target similarities: every student gets None
        per_student = vmap(functools.partial(self._loss, get_loss(loss)), in_dims=in_dims, randomness="error")
        losses = per_student(self.params, self.buffers, masks, x, t, s)
        bad = [k for k in range(len(self)) if not torch.isfinite(losses[k])]
        if bad:
            raise FloatingPointError(f"non-finite training loss of student {bad[0]} ({losses[bad[0]].item()}): "
                                     "lower the learning rate")
        opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        opt.step()

    # ------------------------------------------------------------------------------------------------ unstack
    def materialize(self) -> list[DualEncoder]:
        """The K models with their current stacked parameters and buffers copied in."""
        with torch.no_grad():
            for k, model in enumerate(self.models):
                for name, p in model.named_parameters():
                    p.copy_(self.params[name][k])
                for name, b in model.named_buffers():
                    b.copy_(self.buffers[name][k])
        return self.models


def train_students_batched(dset: DistilledSet, student: StudentConfig, cfg: EvalConfig, seeds: list[int],
                           device: str | torch.device = "cpu",
                           on_eval: Callable[[int, int, list[DualEncoder]], None] | None = None,
                           models: list[DualEncoder] | None = None) -> list[DualEncoder]:
    """Train one student per seed on the phases of ``dset``, batched; equal to ``[train_student(dset, student, cfg,
    s, device) for s in seeds]`` up to rounding. ``on_eval(phase, epoch, models)`` is called where the sequential
    path's hook is, with the K current models."""
    plan = schedule(dset, cfg)
    models = models if models is not None else [build_student(student, seed=s, device=device) for s in seeds]
    stack = StudentStack(models, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    shared = None
    if plan.shared_optimizer:
        opt = stack.optimizer(SGDConfig(*plan.lrs[0], cfg.momentum, cfg.weight_decay))
        shared = (opt, torch.optim.lr_scheduler.MultiStepLR(opt, [plan.epochs[0] // 2 + 1] if plan.lr_drop else [],
                                                             0.1))
    for k, phase in enumerate(dset.phases):
        x_all, t_all, s_all = phase.images, phase.texts, phase.target_similarity()
        epochs = plan.epochs[k]
        if shared is None:
            opt = stack.optimizer(SGDConfig(*plan.lrs[k], cfg.momentum, cfg.weight_decay))
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2 + 1] if plan.lr_drop else [], 0.1)
        else:
            opt, sched = shared
        when = Schedule([epochs], [], plan.batch_size, plan.batching, plan.lr_drop, False, plan.eval_every,
                          plan.eval_offset)
        for epoch in range(epochs):
            orders = [list(index_batches(phase.n, plan.batch_size, g, mode=plan.batching)) for g in gens]
            for idx in zip(*orders):
                x = torch.stack([x_all[i] for i in idx]).to(device)
                t = torch.stack([t_all[i] for i in idx]).to(device)
                s = None if s_all is None else torch.stack([s_all[i][:, i] for i in idx]).to(device)
                stack.step(opt, x, t, s, dset.loss)
            sched.step()
            if on_eval is not None and when.evaluates_after(epoch, epochs):
                on_eval(k, epoch, stack.materialize())
    return stack.materialize()


def evaluate_set_batched(dset: DistilledSet, student: StudentConfig, cfg: EvalConfig, test: SplitData,
                         val: SplitData | None = None, device: str | torch.device = "cpu",
                         progress: bool = True) -> dict[str, Any]:
    """:func:`benchmark.evaluation.evaluate_set` with the ``cfg.students`` students trained batched: the same
    students (seeds), protocols, selection (:class:`benchmark.evaluation.Selection`) and output."""
    seeds = student_seeds(cfg)
    picks = [Selection(dset, cfg, test, val, device) for _ in seeds]

    def on_eval(phase: int, epoch: int, models: list[DualEncoder]) -> None:
        for pick, model in zip(picks, models):
            pick.on_eval(model, phase, epoch)

    with Progress(1, f"{len(seeds)} eval students, batched", "set", enabled=None if progress else False) as bar:
        models = train_students_batched(dset, student, cfg, seeds, device, on_eval if picks[0].hooked else None)
        bar.update()
    return by_protocol(cfg, [pick.results(model) for pick, model in zip(picks, models)])
