"""Image transforms of the reference pipeline (docs/protocols.md#image-transforms), including BLIP-style RandomAugment."""

from __future__ import annotations

from typing import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps

NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
AUGMENTS: tuple[str, ...] = ("none", "blip")
_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


class RandomAugment:
    """BLIP's RandomAugment(N, M) on PIL images, with randomness from torch's RNG.

    ``N`` ops are drawn with replacement from the ten below; each is applied with probability 0.5.
    Magnitudes at level ``M`` (of 10): enhance factor ``M/10*1.8+0.1`` (1.0 at M=5, i.e. a no-op),
    shear ``M/10*0.3``, translate ``M/10*10`` px, rotate ``M/10*30`` degrees, each with a random sign;
    geometric ops fill with grey (128, 128, 128). AutoContrast is ``PIL.ImageOps.autocontrast``: the
    reference versions negate a uint8 offset (BLIP: wraps around) or cast it to int8 (LoRS/PTM: wrong
    for offsets >= 128); PIL's implementation has neither bug.
    """

    OPS: tuple[str, ...] = (
        "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    )

    def __init__(self, n: int = 2, m: int = 5, generator: torch.Generator | None = None) -> None:
        self.n, self.m, self.generator = n, m, generator

    def _rand(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def _signed(self, magnitude: float) -> float:
        return -magnitude if self._rand() < 0.5 else magnitude

    def _apply(self, op: str, img: Image.Image) -> Image.Image:
        level = self.m / _MAX_LEVEL
        if op == "Identity":
            return img
        if op == "AutoContrast":
            return ImageOps.autocontrast(img)
        if op == "Equalize":
            return ImageOps.equalize(img)
        if op in ("Brightness", "Sharpness"):
            enhancer = ImageEnhance.Brightness if op == "Brightness" else ImageEnhance.Sharpness
            return enhancer(img).enhance(level * 1.8 + 0.1)
        if op == "Rotate":
            return img.rotate(self._signed(level * 30.0), resample=Image.BILINEAR, fillcolor=_FILL)
        if op == "ShearX":
            coeffs = (1.0, self._signed(level * 0.3), 0.0, 0.0, 1.0, 0.0)
        elif op == "ShearY":
            coeffs = (1.0, 0.0, 0.0, self._signed(level * 0.3), 1.0, 0.0)
        elif op == "TranslateX":
            coeffs = (1.0, 0.0, self._signed(level * 10.0), 0.0, 1.0, 0.0)
        elif op == "TranslateY":
            coeffs = (1.0, 0.0, 0.0, 0.0, 1.0, self._signed(level * 10.0))
        else:
            raise ValueError(f"unknown RandomAugment op {op!r}")
        return img.transform(img.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_FILL)

    def __call__(self, img: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.OPS), (self.n,), generator=self.generator).tolist()
        for k in picks:
            if self._rand() < 0.5:
                img = self._apply(self.OPS[k], img)
        return img

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, m={self.m})"


def build_transform(kind: str, image_size: int, norm: str = "clip", augment: str = "none") -> Callable:
    """PIL-image -> normalised float tensor ``[3, image_size, image_size]``.

    ``kind="test"``: bicubic resize to exactly (size, size) (aspect ratio not kept), ToTensor, Normalize.
    ``kind="train"`` with ``augment="blip"``: RandomResizedCrop(scale 0.5-1, bicubic), horizontal flip,
    RandomAugment(2, 5), ToTensor, Normalize; with ``augment="none"`` it is the test transform.
    """
    if kind not in ("train", "test"):
        raise ValueError(f"unknown transform kind {kind!r}; valid choices: train, test")
    if norm not in NORMALIZATION:
        raise ValueError(f"unknown normalisation {norm!r}; valid choices: {', '.join(NORMALIZATION)}")
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; valid choices: {', '.join(AUGMENTS)}")
    # torchvision costs ~1.5 s to import (torchvision.ops pulls in torch._dynamo): only when a transform is built
    from torchvision import transforms as T

    mean, std = NORMALIZATION[norm]
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if kind == "train" and augment == "blip":
        head = [
            T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(0.5),
            RandomAugment(2, 5),
        ]
    else:
        head = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose(head + tail)
