"""Harness-owned evaluation (docs/protocols.md#protocols): train fresh students on a DistilledSet, then measure test retrieval.

Protocols:
- ``strict`` (default): a fixed number of epochs per phase; with ``select="final"`` the last model is tested once,
  with ``select="val"`` the epoch is chosen on the *val* split (every ``eval_every`` epochs) and test is read once.
- ``paper``: the published protocol, best r_mean over test evaluations every ``eval_every`` epochs (selection on
  test; docs/protocols.md#paper-protocol). Only for comparison with published numbers; tables label it.

Several protocols are computed from the same student training (``EvalConfig.protocols``).

Phases are trained in order, each with its own learned learning rates and its own optimiser and step schedule
(×0.1 after half of the phase's epochs), unlike the PTM reference's shared scheduler (docs/methods.md#known-bugs-of-the-reference-code, B6).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from benchmark.distilled import DistilledSet
from benchmark.interface import TrainData
from benchmark.metrics import retrieval_metrics
from benchmark.models.student import DualEncoder, StudentConfig, build_student
from benchmark.progress import Progress
from benchmark.seeding import derive_seed, seeded
from benchmark.training import SGDConfig, contrastive_step, encode, freeze_copy, index_batches, make_optimizer

log = logging.getLogger(__name__)
PROTOCOLS = ("strict", "paper")
COMPATS = ("none", "lors", "ptm", "mtt")
METRIC_KEYS = ("ir1", "ir5", "ir10", "tr1", "tr5", "tr10", "r_mean")
PAPER_TIES = "reference"  # the paper protocol ranks ties as the reference code does (docs/protocols.md#tie-order)


@dataclass
class EvalConfig:
    """How evaluation students are trained (defaults: LoRS/PTM students, docs/protocols.md#evaluation-settings)."""

    students: int = 5
    epochs: int = 100
    batch_size: int = 128
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_drop: bool = True
    protocols: list[str] = field(default_factory=lambda: ["strict"])
    select: str = "final"
    eval_every: int = 10
    batching: str = "partition"
    seed: int = 0
    compat: str = "none"  # a published evaluation to reproduce: none | lors | ptm | mtt (see `schedule`)

    def __post_init__(self) -> None:
        if self.compat not in COMPATS:
            raise ValueError(f"eval.compat must be one of {COMPATS}, got {self.compat!r}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ValueError(f"eval.protocols must be a non-empty list from {PROTOCOLS}, got {self.protocols!r}")
        if self.select not in ("final", "val"):
            raise ValueError(f"eval.select must be 'final' or 'val', got {self.select!r}")
        for name in ("students", "epochs", "batch_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"eval.{name} must be positive, got {getattr(self, name)}")


@dataclass
class SplitData:
    """A retrieval split ready for scoring: images (tensor or dataset), caption features, caption -> image map."""

    images: Any
    texts: torch.Tensor
    txt2img: torch.Tensor


def score(model: DualEncoder, split: SplitData, device: str | torch.device,
          ties: str = "pessimistic") -> dict[str, float]:
    """Retrieval metrics of ``model`` on ``split`` (cosine scores; the logit scale does not change rankings);
    ``ties``: the tie rule of :func:`benchmark.metrics.retrieval_metrics`."""
    return split_metrics(encode(model, split.images, split.texts, device), split, ties)


def split_metrics(embeddings: tuple[torch.Tensor, torch.Tensor], split: SplitData,
                  ties: str = "pessimistic") -> dict[str, float]:
    """Retrieval metrics of (image, caption) embeddings of ``split`` (what :func:`score` computes after encoding)."""
    e_img, e_txt = embeddings
    return retrieval_metrics(e_img @ e_txt.T, split.txt2img, ties)


BatchFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass(frozen=True)
class Schedule:
    """How a student is trained on a set's phases: per-phase epochs and (η_img, η_txt), batching, the lr drop, whether
    one optimiser and scheduler run across all phases, and after which epoch indices the hooks evaluate
    (``eval_offset`` = 0: epochs every-1, 2·every-1, … and the last; 1: epochs 0, every, 2·every, … and the last)."""

    epochs: list[int]
    lrs: list[tuple[float, float]]
    batch_size: int
    batching: str
    lr_drop: bool
    shared_optimizer: bool
    eval_every: int
    eval_offset: int = 0

    def evaluates_after(self, epoch: int, epochs: int) -> bool:
        every = self.eval_every
        return epoch == epochs - 1 or bool(every) and (epoch + self.eval_offset * (every - 1) + 1) % every == 0


def schedule(dset: DistilledSet, cfg: EvalConfig) -> Schedule:
    """The training schedule of ``cfg`` for ``dset`` (docs/protocols.md#published-evaluation-switches).

    ``none``: each phase for its own epochs (``phase.epochs`` or ``eval.epochs``) with its own stored η, a fresh
    optimiser and lr drop per phase. ``lors``: 101 epochs, batch 128, overlapping batches, ×0.1 at epoch 51, its η,
    evaluations at epoch indices 0, 10, …, 100. ``ptm``: as ``lors`` per phase, but one optimiser and one scheduler
    across all phases (the drop happens in the first phase) and the *last* phase's η for every phase. ``mtt``:
    51 epochs, batch 64, partition batches, constant lr, η_img for both towers, tested once after training."""
    phases = dset.phases
    if cfg.compat == "none":
        return Schedule([p.epochs or cfg.epochs for p in phases], [(p.lr_img, p.lr_txt) for p in phases],
                        cfg.batch_size, cfg.batching, cfg.lr_drop, False, cfg.eval_every)
    if cfg.compat == "lors":
        return Schedule([101] * len(phases), [(p.lr_img, p.lr_txt) for p in phases], 128, "overlap", True, False,
                        10, eval_offset=1)
    if cfg.compat == "ptm":
        last = (phases[-1].lr_img, phases[-1].lr_txt)
        return Schedule([101] * len(phases), [last] * len(phases), 128, "overlap", True, True, 10, eval_offset=1)
    return Schedule([51] * len(phases), [(p.lr_img, p.lr_img) for p in phases], 64, "partition", False, False, 0)


def fit(model: DualEncoder, n: int, batch: BatchFn, sgd: SGDConfig, epochs: int, loss: str, batch_size: int,
        generator: torch.Generator, device: str | torch.device, lr_drop: bool = True, batching: str = "partition",
        every: int = 0, on_eval: Callable[[int], None] | None = None, desc: str = "",
        optim: tuple[torch.optim.Optimizer, Any] | None = None, eval_offset: int = 0) -> None:
    """Train ``model`` for ``epochs`` over ``n`` pairs; ``batch(idx)`` returns (images, texts, target or None).

    ``on_eval(epoch)`` is called after the epochs :meth:`Schedule.evaluates_after` names. ``optim`` = (optimiser,
    scheduler) continues a shared optimiser (``sgd`` and ``lr_drop`` are then ignored).
    """
    if optim is None:
        opt = make_optimizer(model, sgd)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [epochs // 2 + 1] if lr_drop else [], 0.1)
    else:
        opt, sched = optim
    when = Schedule([epochs], [], batch_size, batching, lr_drop, False, every, eval_offset)
    with Progress(epochs, desc or "epochs", "epoch", enabled=None if desc else False) as bar:
        for epoch in range(epochs):
            for idx in index_batches(n, batch_size, generator, mode=batching):
                x, t, s = batch(idx)
                contrastive_step(model, opt, x.to(device), t.to(device), None if s is None else s.to(device), loss)
            sched.step()
            if on_eval is not None and when.evaluates_after(epoch, epochs):
                on_eval(epoch)
            bar.update()


def train_student(dset: DistilledSet, student: StudentConfig, cfg: EvalConfig, seed: int,
                  device: str | torch.device = "cpu", on_eval: Callable[[int, int], None] | None = None,
                  model: DualEncoder | None = None) -> DualEncoder:
    """Train a student (fresh, seeded, unless ``model`` is given) on the phases of ``dset`` in order.

    ``on_eval(phase, epoch)`` is called every ``cfg.eval_every`` epochs and at the end of each phase.
    """
    plan = schedule(dset, cfg)
    with seeded(seed):  # dropout masks come from the global generator
        model = model if model is not None else build_student(student, seed=seed, device=device)
        gen = torch.Generator().manual_seed(seed)
        loss = dset.loss
        shared = None
        if plan.shared_optimizer:  # one optimiser and one scheduler for all phases (the PTM reference)
            opt = make_optimizer(model, SGDConfig(*plan.lrs[0], cfg.momentum, cfg.weight_decay))
            milestones = [plan.epochs[0] // 2 + 1] if plan.lr_drop else []
            shared = (opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, 0.1))
        for k, phase in enumerate(dset.phases):
            x_all, t_all, s_all = phase.images, phase.texts, phase.target_similarity()

            def batch(idx, x_all=x_all, t_all=t_all, s_all=s_all):
                return x_all[idx], t_all[idx], None if s_all is None else s_all[idx][:, idx]

            hook = (lambda e, k=k: on_eval(k, e)) if on_eval else None
            fit(model, phase.n, batch, SGDConfig(*plan.lrs[k], cfg.momentum, cfg.weight_decay), plan.epochs[k], loss,
                plan.batch_size, gen, device, plan.lr_drop, plan.batching, plan.eval_every, hook, optim=shared,
                eval_offset=plan.eval_offset)
    return model


class Selection:
    """One student's evaluations during training and its result per protocol: ``paper`` keeps the best test r_mean
    over the hooks (the first of equal ones), ``strict`` the final model (``select="final"``) or the val-best weights
    of the last phase (``select="val"``). Each result carries the (phase, epoch) it came from (epoch -1 = end of
    training). When the last hook ran after the last epoch, the final model's test embeddings are reused from it."""

    def __init__(self, dset: DistilledSet, cfg: EvalConfig, test: SplitData, val: SplitData | None,
                 device: str | torch.device):
        if "strict" in cfg.protocols and cfg.select == "val" and val is None:
            raise ValueError("eval.select='val' needs the val split's features: run `mmdd embed` for val")
        self.cfg, self.test, self.val, self.device = cfg, test, val, device
        self.last = len(dset.phases) - 1
        self.end = (self.last, schedule(dset, cfg).epochs[self.last] - 1)  # the hook after the last training step
        self.hooked = "paper" in cfg.protocols or cfg.select == "val"
        self.best: dict[str, tuple[dict[str, Any], tuple[int, int]]] = {}
        self._test_embeddings: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _offer(self, name: str, m: dict[str, Any], where: tuple[int, int]) -> None:
        if name not in self.best or m["r_mean"] > self.best[name][0]["r_mean"]:
            self.best[name] = (m, where)

    def on_eval(self, model: DualEncoder, phase: int, epoch: int) -> None:
        """The hook of :func:`train_student` (``phase``, ``epoch``) for ``model``."""
        if "paper" in self.cfg.protocols:
            emb = encode(model, self.test.images, self.test.texts, self.device)
            self._test_embeddings = ((phase, epoch), emb)
            self._offer("paper", split_metrics(emb, self.test, PAPER_TIES), (phase, epoch))
        if "strict" in self.cfg.protocols and self.cfg.select == "val" and phase == self.last:
            self._offer("val", dict(score(model, self.val, self.device), weights=freeze_copy(model)), (phase, epoch))

    def results(self, model: DualEncoder) -> dict[str, dict[str, Any]]:
        """Per protocol, the metrics of the trained ``model`` (loads the val-best weights for ``select="val"``)."""
        out: dict[str, dict[str, Any]] = {}
        if "paper" in self.cfg.protocols:
            m, (phase, epoch) = self.best["paper"]
            out["paper"] = dict(m, phase=phase, epoch=epoch)
        if "strict" in self.cfg.protocols:
            if self.cfg.select == "val":
                m, (phase, epoch) = self.best["val"]
                model.load_state_dict(m.pop("weights"))
                out["strict"] = dict(score(model, self.test, self.device), val_r_mean=m["r_mean"], phase=phase,
                                     epoch=epoch)
            else:
                kept = self._test_embeddings
                emb = kept[1] if kept is not None and kept[0] == self.end else encode(
                    model, self.test.images, self.test.texts, self.device)
                out["strict"] = dict(split_metrics(emb, self.test), phase=self.last, epoch=-1)
        return out


def evaluate_student(dset: DistilledSet, student: StudentConfig, cfg: EvalConfig, seed: int, test: SplitData,
                     val: SplitData | None = None, device: str | torch.device = "cpu") -> dict[str, dict[str, Any]]:
    """Train one student once and return its test metrics under every protocol of ``cfg.protocols``
    (:class:`Selection`; the paper protocol ranks ties in the reference code's order)."""
    pick = Selection(dset, cfg, test, val, device)
    model = build_student(student, seed=seed, device=device)
    hook = (lambda phase, epoch: pick.on_eval(model, phase, epoch)) if pick.hooked else None
    train_student(dset, student, cfg, seed, device, hook, model=model)
    return pick.results(model)


def evaluate_set(dset: DistilledSet, student: StudentConfig, cfg: EvalConfig, test: SplitData,
                 val: SplitData | None = None, device: str | torch.device = "cpu",
                 progress: bool = True) -> dict[str, Any]:
    """Evaluate ``cfg.students`` seeded students; per protocol: per-student metrics and mean/std per metric."""
    runs = []
    with Progress(cfg.students, "eval students", "student", enabled=None if progress else False) as bar:
        for seed in student_seeds(cfg):
            runs.append(evaluate_student(dset, student, cfg, seed, test, val, device))
            bar.update()
    return by_protocol(cfg, runs)


def student_seeds(cfg: EvalConfig) -> list[int]:
    """The seeds of the ``cfg.students`` evaluation students (independent of method and distillation seed)."""
    return [derive_seed(cfg.seed, "eval-student", k) for k in range(cfg.students)]


def by_protocol(cfg: EvalConfig, runs: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """The evaluation output: per protocol, every student's metrics and their mean/std."""
    return {"select": cfg.select, "protocols": {p: {"students": [r[p] for r in runs], **summarize([r[p] for r in runs])}
                                                for p in cfg.protocols}}


def summarize(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """mean and (sample) std per metric over runs."""
    out = {}
    for key in METRIC_KEYS:
        vals = [r[key] for r in runs]
        out[key] = {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
    return out


def evaluate_full_data(train: TrainData, student: StudentConfig, cfg: EvalConfig, test: SplitData, lr: float,
                       epochs: int, device: str | torch.device = "cpu", progress: bool = True,
                       lr_txt: float | None = None) -> dict[str, Any]:
    """Upper reference: students trained on every training pair (identity targets, CE), tested once at the end.
    ``cfg`` gives the optimiser (momentum, weight decay, lr drop, batch size); ``lr_txt`` defaults to ``lr``."""
    runs = []
    for k, seed in enumerate(student_seeds(cfg)):
        with seeded(seed):
            model = build_student(student, seed=seed, device=device)
            gen = torch.Generator().manual_seed(seed)
            fit(model, train.n_pairs, lambda idx: (*train.pairs(idx), None),
                SGDConfig(lr, lr if lr_txt is None else lr_txt, cfg.momentum, cfg.weight_decay), epochs, "ce",
                cfg.batch_size, gen, device, cfg.lr_drop, "partition",
                desc=f"full-data student {k}" if progress else "")
        runs.append(score(model, test, device))
    return {"select": "final", "protocols": {"strict": {"students": runs, **summarize(runs)}}}


def evaluate_experts(flat_params: list[tuple[torch.Tensor, torch.Tensor]], student: StudentConfig, test: SplitData,
                     device: str | torch.device = "cpu") -> dict[str, Any]:
    """Test retrieval of expert checkpoints given as (flat image-tower, flat text-head) parameters, one per expert;
    the ± of the summary is the std over experts."""
    from benchmark.models.student import FlatStudent

    flat = FlatStudent(build_student(student, seed=0, device=device))
    runs = []
    for img, txt in flat_params:
        flat.load_flat("img", img.to(device))
        flat.load_flat("txt", txt.to(device))
        runs.append(score(flat.model, test, device))
    return {"select": "final", "protocols": {"strict": {"students": runs, **summarize(runs)}}}
