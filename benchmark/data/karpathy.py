"""One loader for Karpathy-format (BLIP) annotation files, used for every dataset.

Train files hold one entry per caption ``{"image", "caption", "image_id"}``; val/test files hold one
entry per image ``{"image", "caption": [...]}`` (docs/protocols.md#karpathy-splits). Extra keys are ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmark.data.captions import pre_caption
from benchmark.data.datasets import annotation_path, check_split, dataset_dir


@dataclass
class CaptionSplit:
    """Images, captions and the ground-truth maps of one split.

    ``image_paths`` are relative to ``root``; ``txt2img[t]`` is the image index of caption ``t``;
    ``img2txt[i]`` lists the caption indices of image ``i`` in increasing order.
    """

    root: Path
    image_paths: list[str]
    captions: list[str]
    txt2img: torch.Tensor  # int64 [n_captions]
    img2txt: list[list[int]]

    @property
    def n_images(self) -> int:
        return len(self.image_paths)

    @property
    def n_captions(self) -> int:
        return len(self.captions)


def _require(entry: Any, keys: tuple[str, ...], path: Path, index: int) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: entry {index} is a {type(entry).__name__}, expected a JSON object")
    for key in keys:
        if key not in entry:
            raise ValueError(f"{path}: entry {index} is missing the key {key!r}")


def _bad(path: Path, index: int, key: str, expected: str) -> ValueError:
    return ValueError(f"{path}: entry {index} has a malformed {key!r} (expected {expected})")


def _fix(path: Path, dataset: str) -> str:
    return f"delete {path} and rerun `mmdd fetch {dataset}`"


def _read_entries(path: Path, dataset: str) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"annotation file {path} not found; run `mmdd fetch {dataset}` (with the same data root) first"
        )
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON in UTF-8, e.g. truncated ({err}); {_fix(path, dataset)}") from None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}; "
                         f"{_fix(path, dataset)}")
    return entries


def _parse_train(entries: list[Any], path: Path, max_words: int):
    image_index: dict[str, int] = {}
    image_paths: list[str] = []
    captions: list[str] = []
    txt2img: list[int] = []
    for k, entry in enumerate(entries):
        _require(entry, ("image", "caption", "image_id"), path, k)
        image, caption, image_id = entry["image"], entry["caption"], str(entry["image_id"])
        if not isinstance(image, str):
            raise _bad(path, k, "image", "a string path")
        if not isinstance(caption, str):
            raise _bad(path, k, "caption", "a string")
        idx = image_index.get(image_id)
        if idx is None:
            idx = image_index[image_id] = len(image_paths)
            image_paths.append(image)
        elif image_paths[idx] != image:
            raise ValueError(
                f"{path}: entry {k} gives image_id {image_id!r} the path {image!r}, "
                f"but an earlier entry gave it {image_paths[idx]!r}"
            )
        captions.append(pre_caption(caption, max_words))
        txt2img.append(idx)
    return image_paths, captions, txt2img


def _parse_eval(entries: list[Any], path: Path, max_words: int):
    image_paths: list[str] = []
    captions: list[str] = []
    txt2img: list[int] = []
    for k, entry in enumerate(entries):
        _require(entry, ("image", "caption"), path, k)
        image, caps = entry["image"], entry["caption"]
        if not isinstance(image, str):
            raise _bad(path, k, "image", "a string path")
        if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
            raise _bad(path, k, "caption", "a non-empty list of strings")
        image_paths.append(image)
        for c in caps:
            captions.append(pre_caption(c, max_words))
            txt2img.append(k)
    return image_paths, captions, txt2img


def load_split(data_root: str | os.PathLike, dataset: str, split: str, max_words: int = 30) -> CaptionSplit:
    """Load ``<data_root>/<dataset>/annotations/<file of split>`` into a :class:`CaptionSplit`.

    Captions pass through :func:`pre_caption` with ``max_words``. Raises ``FileNotFoundError`` when the
    file is missing and ``ValueError`` on an unknown dataset/split, or, naming the file and the fix, on a truncated,
    non-JSON or malformed file.
    """
    check_split(split)
    path = annotation_path(data_root, dataset, split)
    entries = _read_entries(path, dataset)
    parse = _parse_train if split == "train" else _parse_eval
    try:
        image_paths, captions, txt2img = parse(entries, path, max_words)
    except ValueError as err:  # the messages name the file and the entry
        raise ValueError(f"{err}; the file is damaged or not in Karpathy format: {_fix(path, dataset)}") from None
    img2txt: list[list[int]] = [[] for _ in image_paths]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    return CaptionSplit(
        root=dataset_dir(data_root, dataset),
        image_paths=image_paths,
        captions=captions,
        txt2img=torch.tensor(txt2img, dtype=torch.long),
        img2txt=img2txt,
    )
