"""Image transforms: normalisation by hand, augment=none == test, RandomAugment ops and determinism."""

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data.transforms import NORMALIZATION, RandomAugment, build_transform


def _const(rgb=(255, 0, 128), size=(40, 20)) -> Image.Image:
    return Image.new("RGB", size, rgb)


def _noise_image(seed: int = 0, size: int = 48) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("norm, expected", [
    # (255/255 - mean_r)/std_r, (0 - mean_g)/std_g, (128/255 - mean_b)/std_b, computed by hand
    ("clip", (1.9303363, -1.7520971, 0.3399486)),
    ("imagenet", (2.2489083, -2.0357143, 0.4264924)),
    ("half", (1.0, -1.0, 0.0039216)),
])
def test_test_transform_shape_and_normalisation(norm, expected) -> None:
    out = build_transform("test", 16, norm=norm)(_const())
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32  # non-square input resized to a square
    for c in range(3):
        torch.testing.assert_close(out[c], torch.full((16, 16), expected[c]), atol=1e-5, rtol=0)


def test_normalisation_table() -> None:
    assert NORMALIZATION["clip"] == ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def test_train_without_augmentation_is_test() -> None:
    img = _noise_image()
    torch.manual_seed(0)
    a = build_transform("train", 24, augment="none")(img)
    b = build_transform("test", 24)(img)
    assert torch.equal(a, b)


def test_blip_augmentation_deterministic_under_torch_seed() -> None:
    img, tf = _noise_image(), build_transform("train", 24, augment="blip")
    outs = []
    for seed in (0, 0, 1, 2):
        torch.manual_seed(seed)
        outs.append(tf(img))
    assert all(o.shape == (3, 24, 24) for o in outs)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2]) or not torch.equal(outs[0], outs[3])


def test_enhance_ops_are_noops_at_m5_and_geometry_fills_grey() -> None:
    img = _noise_image(1, 16)
    aug = RandomAugment(2, 5, generator=torch.Generator().manual_seed(0))
    for op in ("Identity", "Brightness", "Sharpness"):
        assert np.array_equal(np.asarray(aug._apply(op, img)), np.asarray(img))
    white = _const((255, 255, 255), (32, 32))
    rotated = np.asarray(aug._apply("Rotate", white))
    assert tuple(rotated[0, 0]) == (128, 128, 128)  # a 15 degree turn uncovers the corners
    shifted = np.asarray(aug._apply("TranslateX", white))
    grey_cols = np.all(shifted == 128, axis=(0, 2))
    assert grey_cols.sum() == 5  # translate by 5 px
    assert not np.array_equal(np.asarray(aug._apply("ShearX", white)), np.asarray(white))


def test_autocontrast_stretches_bright_images() -> None:
    # low >= 128 is the case the int8 cast of the reference gets wrong
    arr = np.array([[[150, 150, 150], [200, 200, 200]]], dtype=np.uint8)
    out = np.asarray(RandomAugment()._apply("AutoContrast", Image.fromarray(arr)))
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].min() >= 254  # PIL's float LUT rounds 255.0 down to 254 here


def test_random_augment_uses_torch_rng() -> None:
    img = _noise_image(2, 16)
    torch.manual_seed(3)
    a = np.asarray(RandomAugment()(img))
    torch.manual_seed(3)
    b = np.asarray(RandomAugment()(img))
    assert np.array_equal(a, b)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="train, test"):
        build_transform("eval", 16)
    with pytest.raises(ValueError, match="clip"):
        build_transform("test", 16, norm="bogus")
    with pytest.raises(ValueError, match="blip"):
        build_transform("train", 16, augment="randaug")
