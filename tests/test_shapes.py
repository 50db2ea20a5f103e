"""The embedded shapes dataset: determinism, format, caption/scene agreement, idempotence; image loading."""

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmark.data.images import ImageFolder, gather_images, load_images
from benchmark.data.karpathy import load_split
from benchmark.data.shapes import COLOURS, POSITIONS, SHAPES_VOCAB, generate_shapes
from benchmark.data.transforms import build_transform

SIZES = dict(n_train=40, n_val=10, n_test=30)
SIZE_WORDS = {"small": "(?:small|little)", "large": "(?:large|big)"}
COUNT_WORDS = {2: "two", 3: "three"}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate_shapes(root / "shapes", seed=0, **SIZES)
    return root


def test_vocab() -> None:
    assert len(SHAPES_VOCAB["colours"]) == 8 and len(SHAPES_VOCAB["positions"]) == 9
    assert {"circle", "square", "triangle", "star", "cross"} <= set(SHAPES_VOCAB["kinds"])
    assert SHAPES_VOCAB["sizes"] == ("small", "large")


def test_deterministic_by_seed(data_root: Path, tmp_path: Path) -> None:
    again = generate_shapes(tmp_path / "a", seed=0, **SIZES)
    other = generate_shapes(tmp_path / "b", seed=1, **SIZES)
    first = _files(data_root / "shapes")
    assert first == _files(again)
    changed = _files(other)
    assert changed.keys() == first.keys() and changed != first
    assert changed["images/test/000000.png"] != first["images/test/000000.png"]


def test_karpathy_format_and_sizes(data_root: Path) -> None:
    for split, n in (("train", 40), ("val", 10), ("test", 30)):
        s = load_split(data_root, "shapes", split)
        assert (s.n_images, s.n_captions) == (n, 5 * n)
        assert s.img2txt == [[5 * i + j for j in range(5)] for i in range(n)]
        assert s.image_paths[:2] == [f"images/{split}/000000.png", f"images/{split}/000001.png"]
        assert all((data_root / "shapes" / p).is_file() for p in s.image_paths)
        assert all(len(set(s.captions[5 * i:5 * i + 5])) == 5 for i in range(n))  # paraphrases differ
    train = json.loads((data_root / "shapes/annotations/shapes_train.json").read_text())
    assert train[0]["image_id"] == "train_000000" and train[5]["image_id"] == "train_000001"


def _scenes(root: Path, split: str) -> list[dict]:
    entries = json.loads((root / "shapes/annotations" / f"shapes_{split}.json").read_text())
    return [e["scene"] for e in entries][:: 5 if split == "train" else 1]


@pytest.mark.parametrize("split", ["train", "test"])
def test_captions_bind_attributes_of_drawn_shapes(data_root: Path, split: str) -> None:
    s = load_split(data_root, "shapes", split)
    for i, scene in enumerate(_scenes(data_root, split)):
        for caption in (s.captions[t] for t in s.img2txt[i]):
            for shape in scene["shapes"]:
                same = [o for o in scene["shapes"] if (o["colour"], o["kind"]) == (shape["colour"], shape["kind"])]
                single = rf"\b{SIZE_WORDS[shape['size']]} {shape['colour']} {shape['kind']}\b"
                if len(same) == 1:  # "a large red circle": size, colour and kind bound together
                    assert re.search(single, caption), (caption, shape)
                else:  # "two red circles" or each one spelled out
                    plural = re.search(rf"\b{COUNT_WORDS[len(same)]} (?:\w+ )?{shape['colour']} {shape['kind']}e?s\b",
                                       caption)
                    assert plural or re.search(single, caption), (caption, shape)


def test_images_show_the_scene(data_root: Path) -> None:
    root, hashes = data_root / "shapes", set()
    for i, scene in enumerate(_scenes(data_root, "test")):
        arr = np.asarray(Image.open(root / f"images/test/{i:06d}.png"))
        assert arr.shape == (32, 32, 3)
        hashes.add(hashlib.sha256(arr.tobytes()).hexdigest())
        for shape in scene["shapes"]:
            if shape["size"] == "large":  # a large shape covers the centre of its grid cell
                row, col = divmod(POSITIONS.index(shape["position"]), 3)
                pixel = arr[int((row + 0.5) * 32 / 3), int((col + 0.5) * 32 / 3)].astype(int)
                assert np.abs(pixel - COLOURS[shape["colour"]]).max() <= 25, (i, shape, pixel)
    assert len(hashes) == 30  # every image differs


def test_default_size_test_split_has_few_duplicate_scenes(tmp_path: Path) -> None:
    root = generate_shapes(tmp_path / "shapes", n_train=1, n_val=1, n_test=500)
    keys = [frozenset(tuple(sorted(s.items())) for s in e["scene"]["shapes"])
            for e in json.loads((root / "annotations/shapes_test.json").read_text())]
    assert len(set(keys)) >= 490


def test_idempotent_and_replaces_mismatch(tmp_path: Path) -> None:
    out = generate_shapes(tmp_path / "shapes", seed=0, n_train=5, n_val=2, n_test=3)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert generate_shapes(out, seed=0, n_train=5, n_val=2, n_test=3) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    generate_shapes(out, seed=0, n_train=6, n_val=2, n_test=3)  # different sizes: replaced
    assert load_split(tmp_path, "shapes", "train").n_images == 6
    (out / "annotations/shapes_val.json").unlink()  # incomplete: regenerated
    generate_shapes(out, seed=0, n_train=6, n_val=2, n_test=3)
    assert load_split(tmp_path, "shapes", "val").n_images == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no temp dirs left behind


def test_image_loading(data_root: Path) -> None:
    s = load_split(data_root, "shapes", "val")
    tf = build_transform("test", 32)
    folder = ImageFolder(s.root, s.image_paths, tf)
    stacked = load_images(s.root, s.image_paths, tf, progress=False)
    assert stacked.shape == (10, 3, 32, 32) and stacked.dtype == torch.float32
    assert torch.equal(stacked[3], folder[3])
    assert torch.equal(gather_images(stacked, [4, 1]), gather_images(folder, torch.tensor([4, 1])))
    with pytest.raises(FileNotFoundError, match=r"missing\.png.*mmdd fetch"):
        ImageFolder(s.root, ["images/missing.png"], tf)[0]
