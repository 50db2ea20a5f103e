"""PTM-ST shortcut trajectories: exact endpoints, points on the segment, monotone per-layer β, compact storage."""

from __future__ import annotations

import pytest
import torch

from benchmark.experts.store import ExpertCollection
from matching_fixtures import write_experts
from matching_fixtures import single_thread  # noqa: F401  (autouse)
from methods.matching.config import TeacherSpec
from methods.matching.shortcut import (ShortcutCollection, ShortcutTrajectory, build_shortcuts,
                                       layer_numels_from_meta, shortcut_bytes_report)
from methods.matching.teacher import RawTeacher, ShortcutTeacher, make_teacher


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    return write_experts(tmp_path_factory.mktemp("experts"), n_experts=2, epochs=5)


def _layers(expert, tower):
    return layer_numels_from_meta(expert.meta, tower)


def test_build_keeps_endpoints_lies_on_segment_and_beta_is_monotone(experts, tmp_path):
    paths = build_shortcuts(experts.directory, tmp_path / "sc", 1, 4)
    assert [p.name for p in paths] == ["shortcut_000.safetensors", "shortcut_001.safetensors"]
    for expert, sc in zip(experts, ShortcutCollection(tmp_path / "sc")):
        assert (sc.start, sc.end) == (1, 4) and list(sc.epochs) == [1, 2, 3, 4]
        for tower in ("img", "txt"):
            a, b = expert.read(tower, 1), expert.read(tower, 4)
            assert torch.equal(sc.read(tower, 1), a) and torch.equal(sc.read(tower, 4), b)
            beta = sc.beta[tower]
            numels = _layers(expert, tower)
            assert beta.shape == (len(numels), 4)
            assert torch.all(beta[:, 1:] >= beta[:, :-1]), "β must be non-decreasing per layer"
            assert torch.all(beta[:, 0] == 0) and torch.all(beta[:, -1] == 1)
            # β equals the cumulative step-norm fraction of the raw trajectory, per layer
            raw = [expert.read(tower, e).double() for e in range(1, 5)]
            steps = torch.stack([torch.stack([c.norm() for c in torch.split(raw[p + 1] - raw[p], numels)])
                                 for p in range(3)], 1)
            frac = torch.cumsum(steps, 1) / steps.sum(1, keepdim=True)
            assert torch.allclose(beta[:, 1:], frac, rtol=0, atol=1e-12)
            for t in (2, 3):
                th = sc.read(tower, t).double()
                for layer, (ca, cb, ct) in enumerate(zip(*(torch.split(v.double(), numels) for v in (a, b, th)))):
                    want = ca + beta[layer, t - 1] * (cb - ca)  # on the segment at the layer's β
                    assert torch.allclose(ct, want, rtol=0, atol=1e-6 * max(1.0, float(cb.abs().max())))
            assert list(sc.epochs) == [1, 2, 3, 4]


def test_in_memory_equals_file_and_teacher_reads_only_two_epochs(experts, tmp_path):
    build_shortcuts(experts.directory, tmp_path / "sc", 0, 3)
    filed = ShortcutCollection(tmp_path / "sc")[0]
    mem = ShortcutTrajectory.from_expert(experts[0], 0, 3)
    for tower in ("img", "txt"):
        assert torch.equal(filed.beta[tower], mem.beta[tower])
        for t in range(4):
            assert torch.equal(filed.read(tower, t), mem.read(tower, t))
    teacher = make_teacher(TeacherSpec.parse("shortcut(0, 3)"), experts, tmp_path / "sc", cache_mb=0)
    assert isinstance(teacher, ShortcutTeacher) and teacher.source == str(tmp_path / "sc")
    before = teacher.bytes_read
    th0, th1 = teacher.endpoints(1, 1, 1, "cpu")
    n = sum(v.numel() for v in th0.values())
    assert teacher.bytes_read - before == 2 * 2 * 4 * n  # start & end of both towers, twice (two lerps)
    with pytest.raises(IndexError):
        teacher.endpoints(0, 3, 1, "cpu")
    # without files: computed in memory from the raw experts
    mem_teacher = make_teacher(TeacherSpec("shortcut", 0, 3), experts, None)
    assert mem_teacher.source.startswith("in-memory")
    assert all(torch.equal(a, b) for a, b in zip(mem_teacher.endpoints(1, 1, 1, "cpu")[1].values(), th1.values()))


def test_raw_teacher_reads_two_epochs_and_caches(experts):
    teacher = RawTeacher(ExpertCollection(experts.directory), cache_mb=16)
    th0, th1 = teacher.endpoints(0, 2, 1, "cpu")
    n = sum(v.numel() for v in th0.values())
    assert teacher.bytes_read == 2 * 4 * n
    assert torch.equal(th1["img"], experts[0].read("img", 3))
    teacher.endpoints(0, 2, 1, "cpu")
    assert teacher.bytes_read == 2 * 4 * n and teacher.hits == 4
    with pytest.raises(ValueError, match="start_window"):
        teacher.check_window(0, 6, 1)


def test_bytes_report_and_idempotent_rebuild(experts, tmp_path):
    paths = build_shortcuts(experts.directory, tmp_path / "sc", 0, 5)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    report = shortcut_bytes_report(experts.directory, tmp_path / "sc")
    assert report["experts"] == 2 and report["start"] == 0 and report["end"] == 5
    assert report["shortcut_bytes"] < report["raw_segment_bytes"] <= report["raw_bytes"]
    # two endpoint copies + a small β table, versus six full epochs
    assert report["ratio_vs_segment"] < 0.45
    again = build_shortcuts(experts.directory, tmp_path / "sc", 0, 5)
    assert [p.stat().st_mtime_ns for p in again] == mtimes


def test_bad_segments_and_missing_layer_info(experts, tmp_path):
    with pytest.raises(ValueError, match="beyond"):
        build_shortcuts(experts.directory, tmp_path / "x", 0, 9)
    with pytest.raises(ValueError, match="parameter shapes"):
        layer_numels_from_meta({"index": 0}, "img")
    with pytest.raises(ValueError, match="shortcut"):
        TeacherSpec.parse("shortcut(3, 3)")
    assert TeacherSpec.parse("shortcut(0, 5)") == TeacherSpec("shortcut", 0, 5)
    assert TeacherSpec.parse({"kind": "shortcut", "start": 1, "end": 4}) == TeacherSpec("shortcut", 1, 4)


def test_a_given_shortcut_dir_must_hold_the_segment_never_a_silent_rebuild(experts, tmp_path):
    seg = tmp_path / "shortcut-end2-start0"
    build_shortcuts(experts.directory, seg, 0, 2)
    assert make_teacher(TeacherSpec("shortcut", 0, 2), experts, seg).source == str(seg)
    with pytest.raises(ValueError, match=r"segments other than shortcut\(0, 3\).*mmdd prepare"):
        make_teacher(TeacherSpec("shortcut", 0, 3), experts, seg)
    with pytest.raises(ValueError, match="expert indices"):
        make_teacher(TeacherSpec("shortcut", 0, 2), experts, tmp_path / "absent")
    # without a prepared directory (library use) the β tables are computed in memory
    assert make_teacher(TeacherSpec("shortcut", 0, 3), experts, None).source.startswith("in-memory")


# ----------------------------------------------------------------------------------------------- integrity (Trust)
def _flip_byte(path, key):
    """Flip one bit in the middle of tensor ``key``'s data, in place."""
    import json
    import struct

    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    a, b = json.loads(data[8:8 + n])[key]["data_offsets"]
    data[8 + n + (a + b) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_bit_in_a_shortcut_file_is_detected_and_rebuilt(experts, tmp_path, caplog):
    from benchmark.experts.store import content_problem

    paths = build_shortcuts(experts.directory, tmp_path / "sc", 1, 4)
    good = paths[0].read_bytes()
    mtime1 = paths[1].stat().st_mtime_ns
    _flip_byte(paths[0], "txt.end")
    sc = ShortcutTrajectory.open(paths[0])  # β is intact; the endpoint is checked when first read
    assert torch.equal(sc.read("img", 4), experts[0].read("img", 4))
    with pytest.raises(ValueError, match=r"shortcut_000\.safetensors is corrupt: tensor 'txt\.end'.*`mmdd prepare`"):
        sc.read("txt", 4)
    _flip_byte(paths[1], "img.beta")  # β is read on open: refused there
    with pytest.raises(ValueError, match=r"shortcut_001\.safetensors is corrupt: tensor 'img\.beta'"):
        ShortcutCollection(tmp_path / "sc")
    # the builder verifies content before keeping a file: both corrupt files are rebuilt, bit for bit
    with caplog.at_level("WARNING", logger="methods.matching.shortcut"):
        build_shortcuts(experts.directory, tmp_path / "sc", 1, 4)
    assert "shortcut_000.safetensors" in caplog.text and "shortcut_001.safetensors" in caplog.text
    assert paths[0].read_bytes() == good and paths[1].stat().st_mtime_ns != mtime1
    assert all(content_problem(p) is None for p in paths)


def test_shortcut_without_its_sidecar_is_incomplete_and_rebuilt(experts, tmp_path):
    paths = build_shortcuts(experts.directory, tmp_path / "sc", 0, 2)
    paths[1].with_suffix(".json").unlink()  # crash between the tensor file and its sidecar
    with pytest.raises(ValueError, match=r"shortcut_001\.safetensors is corrupt or incomplete: it has no sidecar"):
        ShortcutCollection(tmp_path / "sc")
    build_shortcuts(experts.directory, tmp_path / "sc", 0, 2)
    assert paths[1].with_suffix(".json").exists() and len(ShortcutCollection(tmp_path / "sc")) == 2
