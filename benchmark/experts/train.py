"""Train expert students and record their trajectories (docs/methods.md#expert-trajectories).

Each expert: a fresh student (seeded), SGD over the training pairs for E epochs with the symmetric CE loss, the
trainable towers' flat parameters recorded at init and after every epoch. Caption features are precomputed and
deterministic (the reference re-encodes captions with BERT dropout on; documented difference, docs/protocols.md#caption-features).

While training, per-pair *forgetting events* are counted for the ``forgetting`` coreset: after each step, a pair
in the batch is *learned* when its image ranks its own caption first in the batch row AND its caption ranks its
image first in the batch column; a forgetting event is a learned -> not-learned transition between two
consecutive presentations of the pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmark import __version__
from benchmark.experts.store import expert_path, expert_problem, sidecar_path, write_expert
from benchmark.interface import TrainData
from benchmark.models.student import FlatStudent, StudentConfig, build_student
from benchmark.progress import Progress
from benchmark.seeding import derive_seed, seeded
from benchmark.training import SGDConfig, contrastive_step, index_batches, make_optimizer, pair_batches

log = logging.getLogger(__name__)


@dataclass
class ExpertConfig:
    """Expert training. Defaults follow the reference (SGD 0.1/0.1, no momentum or decay, batch 128)."""

    num_experts: int = 20
    epochs: int = 10
    lr_img: float = 0.1
    lr_txt: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 128
    seed: int = 0
    num_workers: int = 4  # image-loading workers when images are decoded per access (real datasets)

    def __post_init__(self) -> None:
        for name in ("num_experts", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"experts.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr_img", "lr_txt"):
            if getattr(self, name) <= 0:
                raise ValueError(f"experts.{name} must be positive, got {getattr(self, name)}")


def config_hash(student: StudentConfig, cfg: ExpertConfig, data_id: str, code: str = "") -> str:
    """Hash of everything that determines an expert's trajectory except its index (``code``: a digest of the
    source that trains it)."""
    doc = {"code": code, "student": {k: v for k, v in asdict(student).items() if k != "tower_config"},
           "tower_config": student.tower_config, "data": data_id,
           "experts": {k: v for k, v in asdict(cfg).items() if k not in ("num_experts", "num_workers")}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ForgettingCounter:
    """Per-pair forgetting events (see module docstring)."""

    def __init__(self, n_pairs: int):
        self.prev = torch.zeros(n_pairs, dtype=torch.bool)
        self.seen = torch.zeros(n_pairs, dtype=torch.bool)
        self.events = torch.zeros(n_pairs, dtype=torch.int32)
        self.ever = torch.zeros(n_pairs, dtype=torch.bool)

    @staticmethod
    def learned(logits: torch.Tensor) -> torch.Tensor:
        diag = torch.arange(logits.shape[0], device=logits.device)
        return ((logits.argmax(1) == diag) & (logits.argmax(0) == diag)).cpu()

    def update(self, idx: torch.Tensor, learned: torch.Tensor) -> None:
        forgot = self.seen[idx] & self.prev[idx] & ~learned
        self.events[idx] += forgot.to(torch.int32)
        self.prev[idx] = learned
        self.seen[idx] = True
        self.ever[idx] |= learned


def train_expert(index: int, train: TrainData, student: StudentConfig, cfg: ExpertConfig,
                 device: str | torch.device = "cpu", progress: bool | Progress = True
                 ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor], FlatStudent]:
    """Train expert ``index``; return its trajectory (flat vectors per tower and epoch) and per-pair stats.

    ``progress``: a shared :class:`Progress` counting epochs (``train_experts``), or whether to show this expert's."""
    bar = progress if isinstance(progress, Progress) else Progress(cfg.epochs, f"expert {index}", "epoch",
                                                                    enabled=progress)
    seed = derive_seed(cfg.seed, "expert", index)
    model = build_student(student, seed=seed, device=device)
    flat = FlatStudent(model)
    opt = make_optimizer(model, SGDConfig(cfg.lr_img, cfg.lr_txt, cfg.momentum, cfg.weight_decay))
    gen = torch.Generator().manual_seed(seed)
    traj = {t: [flat.flat(t).cpu().clone()] for t in ("img", "txt")}
    counter = ForgettingCounter(train.n_pairs)
    drop_last = train.n_pairs > cfg.batch_size
    for epoch in range(cfg.epochs):
        batches = list(index_batches(train.n_pairs, cfg.batch_size, gen, drop_last=drop_last))
        for idx, x, t in pair_batches(train, batches, cfg.num_workers, seed + epoch):
            logits = contrastive_step(model, opt, x.to(device), t.to(device), None, "ce")
            counter.update(idx, ForgettingCounter.learned(logits))
        for t in ("img", "txt"):
            traj[t].append(flat.flat(t).cpu().clone())
        log.debug("expert %d epoch %d done", index, epoch + 1)
        bar.update()
    if bar is not progress:
        bar.close()
    stats = {"forget_count": counter.events, "ever_learned": counter.ever.to(torch.uint8)}
    return traj, stats, flat


def train_experts(out_dir: str | Path, train: TrainData, student: StudentConfig, cfg: ExpertConfig,
                  data_id: str, device: str | torch.device = "cpu", indices: Sequence[int] | None = None,
                  progress: bool = True, code: str = "") -> list[Path]:
    """Train the experts ``indices`` (default: all) into ``out_dir``; finished experts with the same config are kept.

    Every expert has an explicit index and a deterministic path, so reruns and parallel workers never collide. An
    existing expert is kept only when its tensor file and sidecar are both there and its content matches the sha256
    in the sidecar (a full pass over the file); a corrupt, half-written or stale one is retrained.
    """
    out_dir = Path(out_dir)
    chash = config_hash(student, cfg, data_id, code)
    paths = []
    ks = list(range(cfg.num_experts) if indices is None else indices)
    bar = Progress(len(ks) * cfg.epochs, f"experts ({len(ks)} x {cfg.epochs} epochs)", "epoch", enabled=progress)
    for k in ks:
        path = expert_path(out_dir, k)
        if path.exists() or sidecar_path(path).exists():
            problem = expert_problem(path, chash)
            if problem is None:
                log.info("expert %d up to date (%s, content hash verified)", k, path.name)
                paths.append(path)
                bar.skip(cfg.epochs)
                continue
            log.warning("expert %d (%s) %s; retraining it", k, path, problem)
        with seeded(derive_seed(cfg.seed, "expert-rng", k)):
            traj, stats, flat = train_expert(k, train, student, cfg, device, bar)
        meta: dict[str, Any] = {
            "index": k, "config_hash": chash, "data_id": data_id, "epochs": cfg.epochs,
            "expert_config": asdict(cfg), "student": {"tower": student.tower, "text_dim": student.text_dim,
                                                      "temperature": student.temperature},
            "param_names": flat.names, "param_shapes": {t: [list(s) for s in flat.shapes[t]] for t in flat.shapes},
            "mmdd_version": __version__, "torch_version": torch.__version__,
        }
        write_expert(path, traj, meta, stats)
        paths.append(path)
        log.info("wrote expert %d to %s", k, path)
    bar.close()
    return paths
