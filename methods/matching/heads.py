"""The frozen-encoder student (engine option ``student = heads``, docs/methods.md#repblend) and its head-only experts.

The student is a FROZEN image encoder f_enc followed by an image ProjectionHead d→d, beside the text ProjectionHead
D→d. Only the two heads are trained, recorded and matched: as a :class:`~benchmark.models.student.DualEncoder` whose
"image tower" is the image head (inputs: encoder features), the flat-parameter machinery of the engine applies
unchanged (θ^img = h_img, θ^txt = h_txt, each in ``named_parameters`` order).

* ``frozen_encoder = expert``: the image tower of harness expert ``encoder_expert`` at its LAST epoch (the task's
  own student trained on the train split only; docs/methods.md#repblend says why).
* ``frozen_encoder = pretrained``: the task's tower config with its published weights (NFNet-L0 on the paper
  preset); missing weights fail with the tower builder's message (they cannot be downloaded offline).

Head-only experts are trained here, in memory, on the encoder features of the training pairs (computed once; the
encoder is frozen and the training images are fixed), with the harness's expert recipe: SGD without momentum,
symmetric CE at the student's τ, dropout on, a fresh seeded pair of heads per expert.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from benchmark.interface import DistillTask, TrainData
from benchmark.models.projection import ProjectionHead
from benchmark.models.student import DualEncoder, FlatStudent
from benchmark.models.towers import build_image_tower, load_tower_config
from benchmark.progress import Progress
from benchmark.seeding import derive_seed, seeded
from benchmark.training import SGDConfig, contrastive_step, index_batches, make_optimizer
from methods.matching.config import HeadExpertSpec, RepresentationSpec

log = logging.getLogger(__name__)

ENCODE_CHUNK = 64  # samples per frozen-encoder call (no coupling across samples, so chunking is exact)


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


def frozen_encoder(task: DistillTask, rep: RepresentationSpec, method: str) -> tuple[nn.Module, int, int, dict]:
    """(encoder in eval mode without gradients, output width, image size, source record)."""
    tower_cfg = task.student.tower_config or load_tower_config(task.student.tower)
    if rep.frozen_encoder == "pretrained":
        if tower_cfg.get("kind") == "convnet" or not tower_cfg.get("pretrained"):
            raise ValueError(f"{method}: frozen_encoder 'pretrained' needs a tower config with published weights "
                             f"(e.g. nfnet_l0), but {task.student.tower!r} has none: use frozen_encoder: expert")
        tower = build_image_tower(tower_cfg, pretrained=True)
        source = {"frozen_encoder": "pretrained", "tower": task.student.tower}
    else:
        experts = task.require_experts(method)
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
    enc, width, image_size, source = frozen_encoder(task, rep, method)
    s = task.student
    return HeadsStudent(enc, make_heads(s.text_dim, width, s.temperature, s.head_dropout, image_size, seed), source)


@torch.no_grad()
def encode(encoder: nn.Module, images: Any, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Features of every image (a tensor or an indexable dataset), in chunks."""
    n = len(images)
    out = []
    for s in range(0, n, ENCODE_CHUNK):
        if isinstance(images, torch.Tensor):
            xb = images[s:s + ENCODE_CHUNK]
        else:
            xb = torch.stack([images[i] for i in range(s, min(n, s + ENCODE_CHUNK))])
        out.append(encoder(xb.to(device, dtype)))
    return torch.cat(out)


def head_experts_hash(source: dict[str, Any], spec: HeadExpertSpec, task: DistillTask) -> str:
    doc = {"encoder": source, "spec": asdict(spec), "student": {k: v for k, v in asdict(task.student).items()},
           "train_pairs": task.train.n_pairs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_head_experts(encoder: nn.Module, train: TrainData, task: DistillTask, spec: HeadExpertSpec,
                       device: torch.device, last_epoch: int) -> list[dict[str, list[torch.Tensor]]]:
    """``spec.count`` head-only trajectories (float32, on the CPU): θ per tower at init and after epochs
    1..``last_epoch``. The recipe has no schedule over ``spec.epochs``, so these are exactly the first epochs of the
    full-length experts; epochs after the last one the phases can reach are never trained."""
    if not 1 <= last_epoch <= spec.epochs:
        raise ValueError(f"the phases' start windows reach head-expert epoch {last_epoch}, but head_experts.epochs "
                         f"is {spec.epochs}: narrow start_window or raise head_experts.epochs")
    dtype = next(encoder.parameters()).dtype
    feats = encode(encoder, train.images, device, dtype).float()
    caption_image = train.caption_image.to(device)
    texts = train.texts.to(device, torch.float32)
    s = task.student
    drop_last = train.n_pairs > spec.batch_size
    bar = Progress(spec.count * last_epoch, f"head experts ({spec.count} x {last_epoch} epochs)", "epoch")
    out = []
    for k in range(spec.count):
        seed = derive_seed(spec.seed, "head-expert", k)
        model = make_heads(s.text_dim, feats.shape[1], s.temperature, s.head_dropout, 0, seed).to(device)
        flat = FlatStudent(model)
        opt = make_optimizer(model, SGDConfig(spec.lr_img, spec.lr_txt))
        gen = torch.Generator().manual_seed(seed)
        traj = {m: [flat.flat(m).cpu().clone()] for m in ("img", "txt")}
        with seeded(derive_seed(spec.seed, "head-expert-rng", k)):  # dropout masks
            for _ in range(last_epoch):
                for idx in index_batches(train.n_pairs, spec.batch_size, gen, drop_last=drop_last):
                    idx = idx.to(device)
                    contrastive_step(model, opt, feats[caption_image[idx]], texts[idx], None, "ce")
                for m in traj:
                    traj[m].append(flat.flat(m).cpu().clone())
                bar.update()
        out.append(traj)
    bar.close()
    return out
