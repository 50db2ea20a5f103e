import json
import struct

import pytest
import torch

from benchmark.experts.store import ExpertCollection, ExpertTrajectory, expert_path, write_expert
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
        got = e.read_epoch(k)
        assert torch.equal(got["img"], traj["img"][k]) and torch.equal(got["txt"], traj["txt"][k])
    assert e.bytes_read == 2 * 4 * (1000 + 300)
    assert torch.isnan(e.read("img", 0)).all()  # proves the corruption is real


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
