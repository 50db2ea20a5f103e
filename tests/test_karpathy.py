"""Karpathy-format loader and dataset registry on small hand-written annotation files."""

import json
from pathlib import Path

import pytest
import torch

from benchmark.data.datasets import DATASETS, annotation_path, dataset_dir, get_dataset_info
from benchmark.data.karpathy import load_split


def _write(root: Path, ds: str, split: str, entries) -> Path:
    path = annotation_path(root, ds, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries))
    return path


TRAIN = [
    {"image": "flickr30k-images/a.jpg", "caption": "A Dog runs.", "image_id": "a"},
    {"image": "flickr30k-images/b.jpg", "caption": "Two cats!", "image_id": "b"},
    {"image": "flickr30k-images/a.jpg", "caption": "The dog (brown).", "image_id": "a"},
    {"image": "flickr30k-images/c.jpg", "caption": "A bird", "image_id": "c"},
    {"image": "flickr30k-images/b.jpg", "caption": "Cats sleep", "image_id": "b"},
]
TEST = [
    {"image": "flickr30k-images/x.jpg", "caption": ["X one.", "X two"]},
    {"image": "flickr30k-images/y.jpg", "caption": ["Y one", "Y two", "Y three"], "extra": 1},
]


def test_registry_and_layout(tmp_path: Path) -> None:
    assert set(DATASETS) == {"shapes", "flickr30k", "coco"}
    assert get_dataset_info("shapes").generated and not get_dataset_info("coco").generated
    assert annotation_path(tmp_path, "coco", "test") == tmp_path / "coco/annotations/coco_karpathy_test.json"
    assert annotation_path(tmp_path, "flickr30k", "val") == tmp_path / "flickr30k/annotations/flickr30k_val.json"
    assert annotation_path(tmp_path, "shapes", "train") == tmp_path / "shapes/annotations/shapes_train.json"
    assert dataset_dir(tmp_path, "coco") == tmp_path / "coco"
    with pytest.raises(ValueError, match="coco, flickr30k, shapes"):
        get_dataset_info("imagenet")


def test_train_split_maps(tmp_path: Path) -> None:
    _write(tmp_path, "flickr30k", "train", TRAIN)
    s = load_split(tmp_path, "flickr30k", "train")
    assert s.root == tmp_path / "flickr30k"
    assert s.image_paths == ["flickr30k-images/a.jpg", "flickr30k-images/b.jpg", "flickr30k-images/c.jpg"]
    assert s.captions == ["a dog runs", "two cats", "the dog brown", "a bird", "cats sleep"]
    assert s.txt2img.dtype == torch.long and s.txt2img.tolist() == [0, 1, 0, 2, 1]
    assert s.img2txt == [[0, 2], [1, 4], [3]]
    assert (s.n_images, s.n_captions) == (3, 5)


def test_eval_split_maps_and_max_words(tmp_path: Path) -> None:
    _write(tmp_path, "flickr30k", "test", TEST)
    s = load_split(tmp_path, "flickr30k", "test")
    assert s.image_paths == ["flickr30k-images/x.jpg", "flickr30k-images/y.jpg"]
    assert s.captions == ["x one", "x two", "y one", "y two", "y three"]
    assert s.txt2img.tolist() == [0, 0, 1, 1, 1]
    assert s.img2txt == [[0, 1], [2, 3, 4]]
    assert load_split(tmp_path, "flickr30k", "test", max_words=1).captions == ["x", "x", "y", "y", "y"]


def test_missing_file_names_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"coco_karpathy_val\.json.*mmdd fetch coco"):
        load_split(tmp_path, "coco", "val")


@pytest.mark.parametrize("split, entries, pattern", [
    ("train", [TRAIN[0], {"image": "i.jpg", "image_id": "i"}], r"entry 1 is missing the key 'caption'"),
    ("train", [{"image": "i.jpg", "caption": "c"}], r"entry 0 is missing the key 'image_id'"),
    ("test", [TEST[0], TEST[1], {"caption": ["c"]}], r"entry 2 is missing the key 'image'"),
    ("val", [{"image": "i.jpg", "caption": "not a list"}], r"entry 0 has a malformed 'caption'"),
    ("train", [TRAIN[0], {"image": "other.jpg", "caption": "c", "image_id": "a"}], r"entry 1 gives image_id 'a'"),
    ("test", {"not": "a list"}, r"expected a JSON list"),
])
def test_malformed_entries(tmp_path: Path, split, entries, pattern) -> None:
    path = _write(tmp_path, "flickr30k", split, entries)
    with pytest.raises(ValueError, match=pattern) as err:
        load_split(tmp_path, "flickr30k", split)
    assert str(path) in str(err.value) and f"delete {path} and rerun `mmdd fetch flickr30k`" in str(err.value)


def test_invalid_json_and_split(tmp_path: Path) -> None:
    path = annotation_path(tmp_path, "coco", "test")
    path.parent.mkdir(parents=True)
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_split(tmp_path, "coco", "test")
    with pytest.raises(ValueError, match="train, val, test"):
        load_split(tmp_path, "coco", "dev")


@pytest.mark.parametrize("damage", ["truncated", "empty", "binary", "cut-in-utf8"])
def test_damaged_annotation_file_names_the_file_and_the_fix(tmp_path: Path, damage: str) -> None:
    path = _write(tmp_path, "coco", "train", TRAIN)
    good = json.dumps([{**TRAIN[0], "caption": "Un café crème"}], ensure_ascii=False).encode()
    path.write_bytes({"truncated": path.read_bytes()[:100], "empty": b"",
                      "binary": b"\x89PNG\r\n\x1a\n\xff\xfe" * 20,
                      "cut-in-utf8": good[:good.index("é".encode()) + 1]}[damage])
    with pytest.raises(ValueError, match="not valid JSON") as err:
        load_split(tmp_path, "coco", "train")
    assert str(path) in str(err.value) and f"delete {path} and rerun `mmdd fetch coco`" in str(err.value)
