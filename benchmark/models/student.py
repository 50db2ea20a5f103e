"""The student dual encoder and its flat-parameter functional view (what trajectory matching trains)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from benchmark.models.projection import ProjectionHead
from benchmark.constants import TOWERS
from benchmark.models.towers import build_image_tower, load_tower_config



@dataclass
class StudentConfig:
    """Student architecture. ``tower`` names a JSON config under ``benchmark/models/configs``."""

    tower: str = "convnet_w32_d3"
    text_dim: int = 384
    temperature: float = 0.07
    head_dropout: float = 0.1
    pretrained: bool | None = None  # None: as the tower config says
    tower_config: dict[str, Any] = field(default_factory=dict)  # resolved config, filled by build_student

    def __post_init__(self) -> None:
        if not 0 < self.temperature < 10:
            raise ValueError(f"student.temperature must be in (0, 10), got {self.temperature}")
        if self.text_dim <= 0:
            raise ValueError(f"student.text_dim must be positive, got {self.text_dim}")


class DualEncoder(nn.Module):
    """Trainable image tower + text projection head over frozen caption features; fixed logit scale ``1/τ``."""

    def __init__(self, image_tower: nn.Module, text_head: nn.Module, temperature: float, image_size: int):
        super().__init__()
        self.image_encoder = image_tower
        self.text_projection = text_head
        self.logit_scale = 1.0 / temperature
        self.image_size = image_size

    def embed_images(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_encoder(x), dim=-1)

    def embed_texts(self, t: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_projection(t), dim=-1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Logits ``s · ê_img ê_txtᵀ`` of shape [len(x), len(t)]."""
        return self.logit_scale * self.embed_images(x) @ self.embed_texts(t).T

    def tower(self, which: str) -> nn.Module:
        return {"img": self.image_encoder, "txt": self.text_projection}[which]


def build_student(cfg: StudentConfig, seed: int | None = None, device: str | torch.device = "cpu") -> DualEncoder:
    """Build a fresh student; ``seed`` fixes the random initialisation (pretrained weights are not affected)."""
    tower_cfg = cfg.tower_config or load_tower_config(cfg.tower)
    fork = torch.random.fork_rng(devices=[]) if seed is not None else _null()
    with fork:
        if seed is not None:
            torch.manual_seed(seed)
        tower = build_image_tower(tower_cfg, pretrained=cfg.pretrained)
        head = ProjectionHead(cfg.text_dim, tower.out_dim, cfg.head_dropout)
    return DualEncoder(tower.module, head, cfg.temperature, tower.image_size).to(device)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


class FlatStudent:
    """Functional view of a :class:`DualEncoder` whose towers take flat parameter vectors.

    The flat order of a tower is its ``named_parameters()`` order (module registration order), which is also the
    order expert trajectories are stored in.
    """

    def __init__(self, model: DualEncoder):
        self.model = model
        self.names: dict[str, list[str]] = {}
        self.shapes: dict[str, list[torch.Size]] = {}
        self.numels: dict[str, list[int]] = {}
        for which in TOWERS:
            named = list(model.tower(which).named_parameters())
            self.names[which] = [n for n, _ in named]
            self.shapes[which] = [p.shape for _, p in named]
            self.numels[which] = [p.numel() for _, p in named]

    @property
    def logit_scale(self) -> float:
        return self.model.logit_scale

    def numel(self, which: str) -> int:
        return sum(self.numels[which])

    def flat(self, which: str) -> torch.Tensor:
        """The tower's current parameters as one detached flat vector."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.tower(which).parameters()])

    def load_flat(self, which: str, flat: torch.Tensor) -> None:
        """Copy a flat vector into the tower's parameters."""
        with torch.no_grad():
            for p, chunk in zip(self.model.tower(which).parameters(), self.split(which, flat)):
                p.copy_(chunk)

    def split(self, which: str, flat: torch.Tensor) -> list[torch.Tensor]:
        if flat.numel() != self.numel(which):
            raise ValueError(f"flat {which} vector has {flat.numel()} entries, the tower has {self.numel(which)}")
        return [c.view(s) for c, s in zip(torch.split(flat, self.numels[which]), self.shapes[which])]

    def layer_slices(self, which: str) -> list[tuple[str, slice]]:
        """(parameter name, slice into the flat vector) per parameter tensor."""
        out, start = [], 0
        for name, n in zip(self.names[which], self.numels[which]):
            out.append((name, slice(start, start + n)))
            start += n
        return out

    def _call(self, which: str, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = dict(zip(self.names[which], self.split(which, flat)))
        return functional_call(self.model.tower(which), params, (x,))

    def embed_images(self, x: torch.Tensor, flat_img: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._call("img", flat_img, x), dim=-1)

    def embed_texts(self, t: torch.Tensor, flat_txt: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._call("txt", flat_txt, t), dim=-1)

    def logits(self, x: torch.Tensor, t: torch.Tensor, flat_img: torch.Tensor, flat_txt: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * self.embed_images(x, flat_img) @ self.embed_texts(t, flat_txt).T


