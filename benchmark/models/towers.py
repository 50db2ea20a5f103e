"""Image towers, described by JSON configs in ``configs/`` (architectures as data, like open_clip)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_DIR = Path(__file__).with_name("configs")


def available_towers() -> list[str]:
    """Names of the shipped tower configs."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_tower_config(name_or_path: str) -> dict[str, Any]:
    """Load a tower config by shipped name (e.g. ``convnet_w32_d3``) or by path to a JSON file."""
    p = Path(name_or_path)
    if p.suffix != ".json":
        p = CONFIG_DIR / f"{name_or_path}.json"
    if not p.exists():
        raise ValueError(f"unknown image tower {name_or_path!r}: choose one of {available_towers()} "
                         f"or pass the path of a tower JSON config")
    return json.loads(p.read_text())


class ConvNet(nn.Module):
    """depth x (conv3x3 -> norm -> ReLU -> avgpool2), then flatten. No batch statistics, so train == eval."""

    def __init__(self, width: int, depth: int, norm: str = "instance", image_size: int = 32, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        size = image_size
        for _ in range(depth):
            layers.append(nn.Conv2d(c, width, 3, padding=1))
            if norm == "instance":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm != "none":
                raise ValueError(f"tower config field 'norm' must be 'instance' or 'none', got {norm!r}")
            layers.append(nn.ReLU(inplace=False))
            layers.append(nn.AvgPool2d(2))
            c = width
            size //= 2
        self.features = nn.Sequential(*layers)
        self.out_dim = width * size * size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


@dataclass
class Tower:
    module: nn.Module
    out_dim: int
    image_size: int


def build_image_tower(config: dict[str, Any] | str, pretrained: bool | None = None) -> Tower:
    """Instantiate the image tower described by ``config`` (a dict or a config name).

    ``pretrained`` overrides the config's ``pretrained`` field (tests build NFNet-L0 with random init).
    """
    cfg = load_tower_config(config) if isinstance(config, str) else dict(config)
    kind = cfg.get("kind")
    if kind == "convnet":
        net = ConvNet(cfg["width"], cfg["depth"], cfg.get("norm", "instance"), cfg["image_size"])
        return Tower(net, net.out_dim, cfg["image_size"])
    if kind == "timm":
        import timm

        use_pt = cfg.get("pretrained", False) if pretrained is None else pretrained
        try:
            net = timm.create_model(cfg["model_name"], pretrained=bool(use_pt), num_classes=0,
                                    global_pool=cfg.get("global_pool", "avg"), **cfg.get("model_kwargs", {}))
        except Exception as exc:  # hub unreachable, missing weights
            raise RuntimeError(
                f"could not build timm model {cfg['model_name']!r} (pretrained={use_pt}): {exc}. "
                "Pretrained weights come from the Hugging Face hub: connect to the network once or set "
                "HF_HOME to a cache that holds them") from exc
        return Tower(net, int(net.num_features), cfg["image_size"])
    if kind == "open_clip":
        import open_clip

        tag = cfg.get("pretrained") if pretrained is None or pretrained else None
        model = open_clip.create_model(cfg["model_name"], pretrained=tag)
        visual = model.visual
        out_dim = int(getattr(visual, "output_dim"))
        return Tower(visual, out_dim, cfg["image_size"])
    if kind == "projection":  # over precomputed image features (the frozen-encoder "heads" student)
        from benchmark.models.projection import ProjectionHead

        head = ProjectionHead(cfg["in_dim"], cfg["in_dim"], cfg.get("dropout", 0.1))
        return Tower(head, cfg["in_dim"], cfg.get("image_size", 0))
    raise ValueError(f"tower config field 'kind' must be convnet, timm, open_clip or projection, got {kind!r}")
