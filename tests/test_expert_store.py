import json
import struct

import pytest
import torch

import benchmark.experts.store as store
from benchmark.experts.store import (ExpertCollection, ExpertTrajectory, content_problem, expert_path, sidecar_path,
                                     write_expert)
from benchmark.io import write_tensors
from benchmark.experts.train import ExpertConfig, ForgettingCounter, train_experts
from tests.helpers import random_train, tiny_student


def _traj(epochs=4, n_img=10, n_txt=7):
    g = torch.Generator().manual_seed(0)
    return {"img": [torch.randn(n_img, generator=g) for _ in range(epochs + 1)],
            "txt": [torch.randn(n_txt, generator=g) for _ in range(epochs + 1)]}


def test_roundtrip_one_file_both_towers(tmp_path):
    traj = _traj()
    path = expert_path(tmp_path, 3)
    write_expert(path, traj, {"index": 3, "config_hash": "abc"}, {"forget_count": torch.arange(5)})
    assert path.name == "expert_003.safetensors" and path.with_suffix(".json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert_003.json", "expert_003.safetensors"]
    e = ExpertTrajectory.open(path)
    assert e.num_timestamps == 5 and e.index == 3
    for t in ("img", "txt"):
        for k in range(5):
            assert torch.equal(e.read(t, k), traj[t][k])
    assert torch.equal(e.stat("forget_count"), torch.arange(5))
    with pytest.raises(IndexError):
        e.read("img", 5)


def _tensor_offsets(path):
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + hlen])
    return 8 + hlen, {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}


def test_lazy_read_touches_only_requested_epochs(tmp_path):
    traj = _traj(epochs=6, n_img=1000, n_txt=300)
    path = expert_path(tmp_path, 0)
    write_expert(path, traj, {"index": 0})
    base, offsets = _tensor_offsets(path)
    # Overwrite every tensor except epochs 2 and 3 with NaN bytes: the lazy reader must never see them.
    data = bytearray(path.read_bytes())
    keep = {"img.e002", "txt.e002", "img.e003", "txt.e003"}
    nan = struct.pack("<f", float("nan"))
    for key, (a, b) in offsets.items():
        if key not in keep:
            data[base + a:base + b] = nan * ((b - a) // 4)
    path.write_bytes(bytes(data))
    e = ExpertTrajectory.open(path)
    for k in (2, 3):
        assert torch.equal(e.read("img", k), traj["img"][k]) and torch.equal(e.read("txt", k), traj["txt"][k])
    assert e.bytes_read == 2 * 4 * (1000 + 300)
    # Per-tensor hashes: the corruption is real, and caught as soon as a corrupted epoch is requested.
    with pytest.raises(ValueError, match=r"expert_000\.safetensors is corrupt: tensor 'img\.e000'.*mmdd experts"):
        e.read("img", 0)
    assert e.bytes_read == 2 * 4 * (1000 + 300)


def test_corrupt_file_gives_clear_error(tmp_path):
    path = expert_path(tmp_path, 0)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt.*mmdd experts"):
        ExpertTrajectory.open(path)
    with pytest.raises(FileNotFoundError, match="mmdd experts"):
        ExpertCollection(tmp_path / "nothing")


def test_collection_sorts_by_explicit_index(tmp_path):
    for k in (10, 2, 1):
        write_expert(expert_path(tmp_path, k), _traj(1), {"index": k})
    assert [e.index for e in ExpertCollection(tmp_path)] == [1, 2, 10]


def test_train_experts_is_idempotent_and_indexed(tmp_path):
    train = random_train()
    cfg = ExpertConfig(num_experts=2, epochs=2, batch_size=8)
    paths = train_experts(tmp_path, train, tiny_student(), cfg, "data-id", progress=False)
    assert [p.name for p in paths] == ["expert_000.safetensors", "expert_001.safetensors"]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    train_experts(tmp_path, train, tiny_student(), cfg, "data-id", progress=False)
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    e0, e1 = ExpertCollection(tmp_path)
    assert e0.num_timestamps == 3
    assert not torch.equal(e0.read("txt", 0), e1.read("txt", 0))  # different seeds per expert
    assert not torch.equal(e0.read("img", 0), e0.read("img", 2))  # it trained
    # A different configuration retrains only what is asked for.
    train_experts(tmp_path, train, tiny_student(), ExpertConfig(num_experts=2, epochs=2, batch_size=8, lr_img=0.05),
                  "data-id", indices=[1], progress=False)
    assert ExpertCollection(tmp_path)[1].meta["config_hash"] != e0.meta["config_hash"]


def test_expert_training_is_deterministic(tmp_path):
    train = random_train()
    cfg = ExpertConfig(num_experts=1, epochs=2, batch_size=8)
    train_experts(tmp_path / "a", train, tiny_student(), cfg, "d", progress=False)
    train_experts(tmp_path / "b", train, tiny_student(), cfg, "d", progress=False)
    a, b = ExpertCollection(tmp_path / "a")[0], ExpertCollection(tmp_path / "b")[0]
    assert torch.equal(a.read("img", 2), b.read("img", 2)) and torch.equal(a.read("txt", 2), b.read("txt", 2))


def test_forgetting_counter_counts_learned_to_forgotten_transitions():
    c = ForgettingCounter(3)
    seq = {0: [1, 0, 1, 0], 1: [0, 0, 1, 1], 2: [1, 1, 1, 1]}
    for step in range(4):
        idx = torch.tensor([0, 1, 2])
        c.update(idx, torch.tensor([bool(seq[i][step]) for i in range(3)]))
    assert c.events.tolist() == [2, 0, 0]
    assert c.ever.tolist() == [True, True, True]


def test_learned_requires_both_directions():
    logits = torch.tensor([[5.0, 1.0], [6.0, 2.0]])  # row 1 prefers caption 0; column 0 prefers image 1
    assert ForgettingCounter.learned(logits).tolist() == [False, False]
    assert ForgettingCounter.learned(torch.eye(2)).tolist() == [True, True]


# ----------------------------------------------------------------------------------------------- integrity (Trust)
def _flip_byte(path, key):
    """Flip the low bit of one byte in the middle of tensor ``key``'s data, in place (a silent bit flip on disk)."""
    base, offsets = _tensor_offsets(path)
    a, b = offsets[key]
    data = bytearray(path.read_bytes())
    data[base + (a + b) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _cfg(**kw):
    return ExpertConfig(num_experts=2, epochs=2, batch_size=8, **kw)


def test_flipped_bit_in_tensor_data_is_detected_by_reader_and_retrained(tmp_path, caplog):
    train = random_train()
    paths = train_experts(tmp_path / "a", train, tiny_student(), _cfg(), "d", progress=False)
    train_experts(tmp_path / "ref", train, tiny_student(), _cfg(), "d", progress=False)  # same seeds: same experts
    _flip_byte(paths[1], "img.e001")
    assert content_problem(paths[1]) and content_problem(paths[0]) is None
    # (b) the lazy reader: untouched epochs still read; the flipped one is refused, naming the file and the fix
    e1 = ExpertCollection(tmp_path / "a")[1]
    assert torch.equal(e1.read("img", 0), ExpertCollection(tmp_path / "ref")[1].read("img", 0))
    with pytest.raises(ValueError, match=r"expert_001\.safetensors is corrupt: tensor 'img\.e001'.*`mmdd experts`"):
        e1.read("img", 1)
    # (a) `mmdd experts` verifies content: expert 1 is retrained (and equals the reference again), expert 0 is kept
    mtime0 = paths[0].stat().st_mtime_ns
    with caplog.at_level("INFO", logger="benchmark.experts.train"):
        train_experts(tmp_path / "a", train, tiny_student(), _cfg(), "d", progress=False)
    assert "expert 1" in caplog.text and "expert_001.safetensors" in caplog.text and "corrupt" in caplog.text
    assert "expert 0 up to date" in caplog.text and paths[0].stat().st_mtime_ns == mtime0
    assert paths[1].read_bytes() == (tmp_path / "ref" / paths[1].name).read_bytes()
    assert content_problem(paths[1]) is None


def test_tampered_header_is_refused_on_open(tmp_path):
    path = expert_path(tmp_path, 0)
    write_expert(path, _traj(), {"index": 0, "config_hash": "abc"})
    raw = path.read_bytes()
    at = raw.index(b"abc")  # inside the header's JSON metadata: still valid JSON after the change
    path.write_bytes(raw[:at] + b"abd" + raw[at + 3:])
    with pytest.raises(ValueError, match=r"expert_000\.safetensors is corrupt or incomplete: it has a header .*"
                                         r"sha256.*`mmdd experts`"):
        ExpertCollection(tmp_path)
    assert "header" in content_problem(path)


def test_crash_before_the_sidecar_is_repaired_on_rerun(tmp_path, monkeypatch):
    train, out = random_train(), tmp_path / "x"
    train_experts(out, train, tiny_student(), _cfg(), "d", indices=[0], progress=False)
    path = expert_path(out, 0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("simulated crash between the tensor file and its sidecar")

    # Retraining for a new configuration dies after the tensor file is renamed into place, before the sidecar.
    monkeypatch.setattr(store, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        train_experts(out, train, tiny_student(), _cfg(lr_img=0.05), "d", indices=[0], progress=False)
    monkeypatch.undo()
    assert path.exists() and not sidecar_path(path).exists()
    with pytest.raises(ValueError, match=r"expert_000\.safetensors is corrupt or incomplete: it has no sidecar"):
        ExpertCollection(out)
    train_experts(out, train, tiny_student(), _cfg(lr_img=0.05), "d", indices=[0], progress=False)
    assert sidecar_path(path).exists() and content_problem(path) is None
    assert ExpertCollection(out)[0].read("img", 2).shape[0] > 0


def test_stale_sidecar_is_repaired_on_rerun(tmp_path):
    """Tensors of one configuration beside the sidecar of another (a crash in a writer that writes the sidecar
    after the tensors, over a previous pair): not up to date, retrained."""
    train, out = random_train(), tmp_path / "x"
    train_experts(out, train, tiny_student(), _cfg(), "d", indices=[0], progress=False)
    path = expert_path(out, 0)
    old_sidecar = sidecar_path(path).read_bytes()
    train_experts(out, train, tiny_student(), _cfg(lr_img=0.05), "d", indices=[0], progress=False)
    new_bytes = path.read_bytes()
    sidecar_path(path).write_bytes(old_sidecar)  # the new tensor file, the old sidecar
    assert "header" in content_problem(path)
    with pytest.raises(ValueError, match="corrupt or incomplete.*mmdd experts"):
        ExpertCollection(out)
    train_experts(out, train, tiny_student(), _cfg(lr_img=0.05), "d", indices=[0], progress=False)
    assert content_problem(path) is None and path.read_bytes() == new_bytes
    assert json.loads(sidecar_path(path).read_text())["config_hash"] == ExpertCollection(out).meta["config_hash"]


def test_files_without_content_hashes_are_not_trusted(tmp_path):
    """An expert as written before hashes were recorded (tensor file + plain-metadata sidecar) is refused."""
    path = expert_path(tmp_path, 0)
    meta = {"index": 0, "format_version": 1, "num_timestamps": 1}
    write_tensors(path, {"img.e000": torch.zeros(3), "txt.e000": torch.zeros(2)},
                  metadata={"mmdd": json.dumps(meta)})
    sidecar_path(path).write_text(json.dumps(meta))
    assert "older version" in content_problem(path)
    with pytest.raises(ValueError, match="older version.*mmdd experts"):
        ExpertTrajectory.open(path)
