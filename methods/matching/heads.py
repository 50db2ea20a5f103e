"""The frozen-encoder student (engine option ``student = heads``, docs/methods.md#repblend) and its head-only experts.

The student is a FROZEN image encoder f_enc followed by an image ProjectionHead d→d, beside the text ProjectionHead
D→d. Only the two heads are trained, recorded and matched: as a :class:`~benchmark.models.student.DualEncoder` whose
"image tower" is the image head (inputs: encoder features), the flat-parameter machinery of the engine applies
unchanged (θ^img = h_img, θ^txt = h_txt, each in ``named_parameters`` order).

* ``frozen_encoder = expert``: the image tower of harness expert ``encoder_expert`` at its LAST epoch (the task's
  own student trained on the train split only; docs/methods.md#repblend says why).
* ``frozen_encoder = pretrained``: the task's tower config with its published weights (NFNet-L0 on the paper
  preset); missing weights fail with the tower builder's message (they cannot be downloaded offline).

Head-only experts are a prepared artifact (``head-experts``, :mod:`.artifacts`): ``mmdd prepare`` trains them once
per dataset on the encoder features of the training pairs (computed once; the encoder is frozen and the training
images are fixed), with the harness's expert recipe — SGD without momentum, symmetric CE at the student's τ, dropout
on, a fresh seeded pair of heads per expert — and writes them in the verified expert format
(:mod:`benchmark.experts.store`, one ``expert_NNN.safetensors`` per expert); the engine reads them lazily from there
(:func:`open_head_experts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmark.constants import TOWERS
from benchmark.experts.store import (ExpertCollection, ExpertTrajectory, expert_path, expert_problem, indexed_files,
                                     open_checked, read_checked, sidecar_path, tensor_key, write_expert)
from benchmark.interface import DistillTask, TrainData
from benchmark.models.projection import ProjectionHead
from benchmark.models.student import DualEncoder, FlatStudent, StudentConfig
from benchmark.models.towers import build_image_tower, load_tower_config
from benchmark.progress import Progress
from benchmark.seeding import derive_seed, seeded
from benchmark.training import SGDConfig, contrastive_step, image_chunks, index_batches, make_optimizer
from methods.matching.config import HeadExpertSpec, RepresentationSpec

log = logging.getLogger(__name__)

ENCODE_CHUNK = 64  # samples per frozen-encoder call (no coupling across samples, so chunking is exact)
WHAT, COMMAND = "head expert", "mmdd prepare"


@dataclass
class HeadsStudent:
    """The frozen encoder and a (fresh) pair of heads; ``source`` identifies the encoder's weights."""

    encoder: nn.Module
    model: DualEncoder
    source: dict[str, Any]


def load_flat_into(module: nn.Module, flat: torch.Tensor, where: str) -> None:
    """Copy a flat vector (``named_parameters`` order) into ``module``'s parameters."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    if flat.numel() != total:
        raise ValueError(f"{where} holds {flat.numel()} image-tower parameters but the tower has {total}: the "
                         "experts were trained for another student config; rerun `mmdd experts`")
    with torch.no_grad():
        for p, chunk in zip(params, torch.split(flat.reshape(-1), [p.numel() for p in params])):
            p.copy_(chunk.view_as(p))


def frozen_encoder(student: StudentConfig, rep: RepresentationSpec, experts: ExpertCollection | None,
                   method: str) -> tuple[nn.Module, int, int, dict]:
    """(encoder in eval mode without gradients, output width, image size, source record). ``experts``: the harness
    experts (needed when ``rep.frozen_encoder == "expert"``)."""
    tower_cfg = student.tower_config or load_tower_config(student.tower)
    if rep.frozen_encoder == "pretrained":
        if tower_cfg.get("kind") == "convnet" or not tower_cfg.get("pretrained"):
            raise ValueError(f"{method}: frozen_encoder 'pretrained' needs a tower config with published weights "
                             f"(e.g. nfnet_l0), but {student.tower!r} has none: use frozen_encoder: expert")
        tower = build_image_tower(tower_cfg, pretrained=True)
        source = {"frozen_encoder": "pretrained", "tower": student.tower}
    else:
        if experts is None:
            raise RuntimeError(f"{method}: frozen_encoder 'expert' needs the harness experts: declare "
                               "Requirement('experts') and run `mmdd experts` first")
        k = rep.encoder_expert
        if not 0 <= k < len(experts):
            raise ValueError(f"{method}: encoder_expert {k} is not one of the {len(experts)} experts in "
                             f"{experts.directory}: pick 0..{len(experts) - 1}")
        last = experts[k].num_timestamps - 1
        tower = build_image_tower(tower_cfg, pretrained=False)
        load_flat_into(tower.module, experts[k].read("img", last, "cpu"), f"expert {k} ({experts.directory})")
        source = {"frozen_encoder": "expert", "expert": k, "epoch": last,
                  "config_hash": experts.meta.get("config_hash")}
    enc = tower.module.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc, tower.out_dim, tower.image_size, source


def make_heads(text_dim: int, width: int, temperature: float, dropout: float, image_size: int,
               seed: int | None) -> DualEncoder:
    """A fresh (seeded) image head width→width and text head text_dim→width as a DualEncoder over features."""
    with seeded(seed) if seed is not None else contextlib.nullcontext():
        img = ProjectionHead(width, width, dropout)
        txt = ProjectionHead(text_dim, width, dropout)
    return DualEncoder(img, txt, temperature, image_size)


def build_heads_student(task: DistillTask, rep: RepresentationSpec, method: str, seed: int) -> HeadsStudent:
    experts = task.require_experts(method) if rep.frozen_encoder == "expert" else None
    enc, width, image_size, source = frozen_encoder(task.student, rep, experts, method)
    s = task.student
    return HeadsStudent(enc, make_heads(s.text_dim, width, s.temperature, s.head_dropout, image_size, seed), source)


@torch.no_grad()
def encode(encoder: nn.Module, images: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Features of every image (a tensor or an indexable dataset), in chunks."""
    return torch.cat([encoder(xb.to(device, dtype)) for xb in image_chunks(images, ENCODE_CHUNK)])


# ------------------------------------------------------------------------------------------------ head experts
def head_experts_hash(source: dict[str, Any], spec: HeadExpertSpec, student: StudentConfig, train_id: str) -> str:
    """Identity of a set of head experts: encoder, recipe (``spec.epochs`` = the epochs trained), student, data."""
    doc = {"encoder": source, "spec": asdict(spec), "student": asdict(student), "train": train_id}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class HeadFeatures:
    """The training pairs as the heads see them: encoder features per image, caption features, pair → image."""

    feats: torch.Tensor
    texts: torch.Tensor
    caption_image: torch.Tensor

    @classmethod
    def of(cls, encoder: nn.Module, train: TrainData, device: torch.device) -> "HeadFeatures":
        dtype = next(encoder.parameters()).dtype
        return cls(encode(encoder, train.images, device, dtype).float(), train.texts.to(device, torch.float32),
                   train.caption_image.to(device))

    @property
    def n_pairs(self) -> int:
        return int(self.texts.shape[0])


def train_head_expert(k: int, data: HeadFeatures, student: StudentConfig, spec: HeadExpertSpec, device: torch.device,
                      bar: Progress | None = None) -> tuple[dict[str, list[torch.Tensor]], FlatStudent]:
    """Head-only expert ``k`` (float32, on the CPU): θ per tower at init and after epochs 1..``spec.epochs``. Each
    expert has its own seeds, so any subset can be (re)trained alone. The recipe has no schedule over the epochs, so
    fewer epochs give exactly the first epochs of a longer run."""
    seed = derive_seed(spec.seed, "head-expert", k)
    model = make_heads(student.text_dim, data.feats.shape[1], student.temperature, student.head_dropout, 0,
                       seed).to(device)
    flat = FlatStudent(model)
    opt = make_optimizer(model, SGDConfig(spec.lr_img, spec.lr_txt))
    gen = torch.Generator().manual_seed(seed)
    drop_last = data.n_pairs > spec.batch_size
    traj = {m: [flat.flat(m).cpu().clone()] for m in TOWERS}
    with seeded(derive_seed(spec.seed, "head-expert-rng", k)):  # dropout masks
        for _ in range(spec.epochs):
            for idx in index_batches(data.n_pairs, spec.batch_size, gen, drop_last=drop_last):
                idx = idx.to(device)
                contrastive_step(model, opt, data.feats[data.caption_image[idx]], data.texts[idx], None, "ce")
            for m in traj:
                traj[m].append(flat.flat(m).cpu().clone())
            if bar is not None:
                bar.update()
    return traj, flat


def build_head_experts(out_dir: Path, encoder: nn.Module, source: dict[str, Any], spec: HeadExpertSpec,
                       student: StudentConfig, train: Callable[[], TrainData], train_id: str,
                       device: str | torch.device) -> list[Path]:
    """Write experts ``0..spec.count-1`` to ``out_dir`` (store format). Idempotent: an expert whose file pair is
    intact (full content hash) and was built for this hash is kept; a missing, corrupt, half-written or stale one is
    (re)trained, and only then are the training pairs loaded and encoded. Files of other indices are removed."""
    device = torch.device(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_hash = head_experts_hash(source, spec, student, train_id)
    paths = [expert_path(out_dir, k) for k in range(spec.count)]
    todo = []
    for k, path in enumerate(paths):
        problem = expert_problem(path, config_hash)
        if problem is not None:
            (log.warning if path.exists() else log.debug)("head expert %s %s; training it", path, problem)
            todo.append(k)
    for extra in set(out_dir.glob("expert_*")) - set(paths) - {sidecar_path(p) for p in paths}:
        extra.unlink()
    if todo:
        data = HeadFeatures.of(encoder.to(device), train(), device)
        bar = Progress(len(todo) * spec.epochs, f"head experts ({len(todo)} x {spec.epochs} epochs)", "epoch")
        for k in todo:
            traj, flat = train_head_expert(k, data, student, spec, device, bar)
            meta = {"index": k, "config_hash": config_hash, "epochs": spec.epochs, "encoder": source,
                    "spec": asdict(spec), "param_names": flat.names,
                    "param_shapes": {m: [list(s) for s in flat.shapes[m]] for m in flat.shapes}}
            write_expert(paths[k], traj, meta)
        bar.close()
    log.info("head experts in %s: %d trained, %d kept", out_dir, len(todo), spec.count - len(todo))
    return paths


class HeadExpertTrajectory(ExpertTrajectory):
    """One head expert file: the store's lazy, hash-checked reader; its errors name ``mmdd prepare``."""

    @classmethod
    def open(cls, path: str | Path) -> "HeadExpertTrajectory":
        meta, digests = open_checked(path, WHAT, COMMAND)
        return cls(Path(path), meta, digests=digests)

    def read(self, tower: str, epoch: int, device: str | torch.device = "cpu") -> torch.Tensor:
        if tower not in TOWERS or not 0 <= epoch < self.num_timestamps:
            raise IndexError(f"{self.path.name} has towers {TOWERS} and epochs 0..{self.num_timestamps - 1}, asked "
                             f"for {tower!r} {epoch}")
        t = read_checked(self.path, tensor_key(tower, epoch), self.digests, device, WHAT, COMMAND)
        self.bytes_read += t.numel() * t.element_size()
        return t


class HeadExpertCollection(ExpertCollection):
    """Every head expert of one prepared directory, sorted by index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        paths = indexed_files(self.directory, "expert", "head-only expert trajectories", COMMAND)
        self.experts = [HeadExpertTrajectory.open(p) for p in paths]


def open_head_experts(directory: Path | None, spec: HeadExpertSpec, source: dict[str, Any],
                      method: str) -> HeadExpertCollection:
    """The prepared head experts in ``directory``, checked to be ``spec.count`` experts of ``spec.epochs`` epochs over
    the encoder ``source`` (tensors are hash-checked as they are read); every error names the fix."""
    fix = f"rerun `{COMMAND} --method {method}`"
    if directory is None:
        raise FileNotFoundError(f"{method}: the head-only experts are a prepared artifact and this task has no "
                                f"prepared root: run `{COMMAND} --method {method}` (library use: build them with "
                                "methods.matching.artifacts.HeadExpertsArtifact and set task.prepared)")
    experts = HeadExpertCollection(directory)
    problems = []
    if sorted(e.index for e in experts) != list(range(spec.count)):
        problems.append(f"expert indices {sorted(e.index for e in experts)}, want 0..{spec.count - 1}")
    if len({e.meta.get("config_hash") for e in experts}) != 1:
        problems.append("experts of different builds")
    if any(e.num_timestamps != spec.epochs + 1 for e in experts):
        problems.append(f"trajectories of other lengths than {spec.epochs} epochs")
    if any(e.meta.get("encoder") != source for e in experts):
        problems.append(f"another frozen encoder than {source}")
    if problems:
        raise ValueError(f"head experts in {directory} do not fit ({'; '.join(problems)}): {fix}")
    return experts
