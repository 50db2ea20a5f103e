"""Downloads, extraction and dataset fetching against a local HTTP server (never the internet)."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import logging
import re
import stat
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from benchmark.data import fetch as F
from benchmark.data import sources as S
from benchmark.data.fetch import ChecksumError, FetchError, check_dataset, download, extract, fetch_dataset
from http_fixture import FixtureServer, dead_url, http_server  # noqa: F401  (pytest fixture)

FAST = {"retries": 3, "backoff": 0.01, "timeout": 10.0, "progress": False}


def blob(n: int, seed: int = 0) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.name.endswith((".part", ".tmp")) or p.name.startswith(".extract-"))


# ------------------------------------------------------------------------------------------------------ download --

def test_clean_download(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(300_000)
    url = http_server.add("/f.bin", data)
    out = download(url, tmp_path / "sub" / "f.bin", sha256=sha(data), expected_bytes=len(data), **FAST)
    assert out.read_bytes() == data
    assert http_server.count() == 1 and http_server.bytes_served["/f.bin"] == len(data)
    assert leftovers(tmp_path) == []


def test_resume_after_dropped_connection(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(1_000_000, seed=1)
    url = http_server.add("/big.bin", data, drop_after=300_000)
    download(url, tmp_path / "big.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "big.bin").read_bytes() == data
    reqs = http_server.for_path("/big.bin")
    assert [r.status for r in reqs] == [200, 206]
    assert reqs[0].range is None and reqs[1].range == "bytes=300000-"
    assert http_server.bytes_served["/big.bin"] < 2 * len(data)
    assert leftovers(tmp_path) == []


def test_repeated_drops_with_progress_do_not_exhaust_retries(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(100_000, seed=6)
    url = http_server.add("/a.bin", data, drop_after=15_000, drop_times=5)
    download(url, tmp_path / "a.bin", sha256=sha(data), retries=1, backoff=0.001, progress=False)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [r.range for r in http_server.requests] == [None] + [f"bytes={15_000 * k}-" for k in range(1, 6)]
    assert http_server.bytes_served["/a.bin"] == len(data)


def test_resume_part_left_by_an_earlier_run(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(200_000, seed=2)
    url = http_server.add("/a.bin", data)
    (tmp_path / "a.bin.part").write_bytes(data[:150_000])
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert http_server.bytes_served["/a.bin"] == 50_000


def test_part_holding_the_whole_file(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(10_000, seed=3)
    url = http_server.add("/a.bin", data)
    (tmp_path / "a.bin.part").write_bytes(data)
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [r.status for r in http_server.requests] == [416]


def test_server_ignoring_range_restarts_cleanly(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(100_000, seed=4)
    url = http_server.add("/a.bin", data, ignore_range=True)
    (tmp_path / "a.bin.part").write_bytes(b"garbage" * 1000)
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [r.status for r in http_server.requests] == [200]


def test_stale_part_that_fails_verification_is_redone_once(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(100_000, seed=5)
    url = http_server.add("/a.bin", data)
    (tmp_path / "a.bin.part").write_bytes(b"\0" * 40_000)  # right length prefix, wrong bytes
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [r.range for r in http_server.requests] == ["bytes=40000-", None]


def test_retry_after_500s(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(5_000)
    url = http_server.add("/a.bin", data, fail_500=2)
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [r.status for r in http_server.requests] == [500, 500, 200]


def test_persistent_500_gives_up_with_url(http_server: FixtureServer, tmp_path: Path) -> None:
    url = http_server.add("/a.bin", b"x", fail_500=100)
    with pytest.raises(FetchError, match=r"after 4 attempts.*HTTP 500") as exc:
        download(url, tmp_path / "a.bin", **FAST)
    assert url in str(exc.value)
    assert http_server.count() == 4 and not (tmp_path / "a.bin").exists()


def test_checksum_mismatch_deletes_and_explains(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(5_000)
    url = http_server.add("/a.bin", data)
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as exc:
        download(url, tmp_path / "a.bin", sha256=wrong, **FAST)
    msg = str(exc.value)
    assert wrong in msg and sha(data) in msg and "deleted" in msg and url in msg
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch(http_server: FixtureServer, tmp_path: Path) -> None:
    url = http_server.add("/a.bin", blob(5_000))
    with pytest.raises(ChecksumError, match="announces 5000 bytes, expected 4999"):
        download(url, tmp_path / "a.bin", expected_bytes=4_999, **FAST)
    assert list(tmp_path.iterdir()) == []
    close_delimited = http_server.add("/c.bin", blob(5_000), close_delimited=True)  # size known only at the end
    with pytest.raises(ChecksumError, match="expected 4999 bytes, got 5000"):
        download(close_delimited, tmp_path / "c.bin", expected_bytes=4_999, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_404_names_url_and_manual_alternative(http_server: FixtureServer, tmp_path: Path) -> None:
    url = http_server.url("/missing.json")
    dest = tmp_path / "missing.json"
    with pytest.raises(FetchError) as exc:
        download(url, dest, **FAST)
    msg = str(exc.value)
    assert url in msg and "404" in msg and f"put it at {dest}" in msg
    assert http_server.count() == 1  # not retried
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host(tmp_path: Path) -> None:
    url = dead_url("/a.json")
    dest = tmp_path / "a.json"
    with pytest.raises(FetchError) as exc:
        download(url, dest, retries=1, backoff=0.01, timeout=5, progress=False)
    msg = str(exc.value)
    assert url in msg and "after 2 attempts" in msg and f"put it at {dest}" in msg


def test_rerun_downloads_nothing(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(5_000)
    url = http_server.add("/a.bin", data)
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    http_server.reset_counts()
    download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    download(url, tmp_path / "a.bin", **FAST)  # nothing to verify against: kept as is
    assert http_server.count() == 0


def test_corrupt_existing_file_is_redownloaded(http_server: FixtureServer, tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    data = blob(5_000)
    url = http_server.add("/a.bin", data)
    (tmp_path / "a.bin").write_bytes(b"tampered")
    with caplog.at_level(logging.WARNING):
        download(url, tmp_path / "a.bin", sha256=sha(data), **FAST)
    assert (tmp_path / "a.bin").read_bytes() == data and "does not verify" in caplog.text


def test_disk_full_message(http_server: FixtureServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = http_server.add("/a.bin", blob(5_000))
    real_open = open

    class Full(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, b) -> int:  # type: ignore[override]
            raise OSError(errno.ENOSPC, "No space left on device")

    def fake_open(path, mode="r", *a, **k):
        return Full() if mode[0] in "wa" else real_open(path, mode, *a, **k)

    monkeypatch.setattr(F, "open", fake_open, raising=False)
    with pytest.raises(FetchError, match=r"disk full while writing .*a\.bin\.part.*Free space"):
        download(url, tmp_path / "a.bin", **FAST)
    assert http_server.count() == 1  # not retried


# ----------------------------------------------------------------------------------------------------- extract --

def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(members: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("member", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt", "a\\..\\..\\evil.txt"])
def test_zip_path_traversal_rejected(tmp_path: Path, member: str) -> None:
    arc = tmp_path / "bad.zip"
    arc.write_bytes(make_zip({"ok/a.txt": b"a", member: b"evil"}))
    dest = tmp_path / "ds"
    with pytest.raises(FetchError, match="path traversal"):
        extract(arc, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert list(dest.iterdir()) == []  # the temporary extraction directory is gone too


def test_tar_traversal_and_escaping_symlink_rejected(tmp_path: Path) -> None:
    for i, (members, links) in enumerate([({"../evil.txt": b"x"}, None),
                                          ({"ok.txt": b"x"}, {"imgs/link": "../../etc/passwd"}),
                                          ({"ok.txt": b"x"}, {"imgs/link": "/etc/passwd"})]):
        arc = tmp_path / f"bad{i}.tar.gz"
        arc.write_bytes(make_tar(members, links))
        with pytest.raises(FetchError, match="path traversal|symbolic link"):
            extract(arc, tmp_path / "ds")
    assert list((tmp_path / "ds").iterdir()) == []


def test_tar_internal_symlink_refused(tmp_path: Path) -> None:
    arc = tmp_path / "links.tar.gz"
    arc.write_bytes(make_tar({"d/a.jpg": b"a"}, {"d/sub/link.jpg": "../a.jpg"}))
    with pytest.raises(FetchError, match=r"member 'd/sub/link\.jpg' is a symbolic link to '\.\./a\.jpg'"):
        extract(arc, tmp_path / "ds")
    assert list((tmp_path / "ds").iterdir()) == []


def test_extract_merges_and_selects_nested_image_dir(tmp_path: Path) -> None:
    arc = tmp_path / "kaggle.zip"
    arc.write_bytes(make_zip({"flickr30k_images/results.csv": b"x",
                              "flickr30k_images/flickr30k_images/1.jpg": b"1",
                              "flickr30k_images/flickr30k_images/2.jpg": b"2"}))
    dest = tmp_path / "ds"
    (dest / "flickr30k-images").mkdir(parents=True)
    (dest / "flickr30k-images" / "0.jpg").write_bytes(b"0")  # already there: kept, merged with the archive
    out = extract(arc, dest, target="flickr30k-images")
    assert sorted(p.name for p in out.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert sorted(p.name for p in dest.iterdir()) == ["flickr30k-images"]
    plain = tmp_path / "plain.tar.gz"
    plain.write_bytes(make_tar({"train2014/a.jpg": b"a", "README": b"r"}))
    extract(plain, dest)
    assert (dest / "train2014" / "a.jpg").read_bytes() == b"a" and (dest / "README").is_file()


def test_extract_rejects_non_archive(tmp_path: Path) -> None:
    (tmp_path / "x.zip").write_bytes(b"not an archive")
    with pytest.raises(FetchError, match="neither a zip nor a tar"):
        extract(tmp_path / "x.zip", tmp_path / "ds")


# ---------------------------------------------------------------------------------------------- fetch_dataset --

def image_bytes(i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (40 * i % 256, 90, 200)).save(buf, format=fmt)
    return buf.getvalue()


class Fixture:
    """A tiny Flickr30k-like dataset: Karpathy JSONs served over HTTP and an image archive."""

    def __init__(self, server: FixtureServer, *, drop_image: str | None = None, layout: str = "kaggle") -> None:
        ids = {"train": ["101", "102", "103"], "val": ["201"], "test": ["301", "302"]}
        self.images = {f"{i}.jpg" if int(i) % 2 else f"{i}.png": image_bytes(int(i), "JPEG" if int(i) % 2 else "PNG")
                       for split in ids.values() for i in split}
        path = {i: f"flickr30k-images/{i}.jpg" if int(i) % 2 else f"flickr30k-images/{i}.png"
                for split in ids.values() for i in split}
        self.ann = {
            "flickr30k_train.json": [{"image": path[i], "caption": f"A photo number {i}, take {k}.", "image_id": i}
                                     for i in ids["train"] for k in range(2)],
            "flickr30k_val.json": [{"image": path[i], "caption": [f"val {i} a", f"val {i} b"]} for i in ids["val"]],
            "flickr30k_test.json": [{"image": path[i], "caption": [f"Test {i} one!", f"test {i} two"]}
                                    for i in ids["test"]],
        }
        for name, entries in self.ann.items():
            server.add(f"/ann/{name}", json.dumps(entries).encode())
        members = {name: data for name, data in self.images.items() if name != drop_image}
        if layout == "kaggle":  # Kaggle's nested layout plus a stray CSV
            archive = make_zip({"flickr30k_images/results.csv": b"image|caption\n",
                                **{f"flickr30k_images/flickr30k_images/{n}": d for n, d in members.items()}})
            self.archive_url = server.add("/img/flickr30k_images.zip", archive)
        else:
            archive = make_tar({f"flickr30k-images/{n}": d for n, d in members.items()})
            self.archive_url = server.add("/img/flickr30k-images.tar.gz", archive)
        self.archive = archive
        self.base_url = server.url("/ann")
        self.sizes = {"train": (3, 6), "val": (1, 2), "test": (2, 4)}


@pytest.fixture
def unpinned_flickr(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flickr30k source without its pinned hashes (fixture files differ from the real ones)."""
    src = S.SOURCES["flickr30k"]
    anns = {k: dataclasses.replace(f, sha256=None, bytes=None) for k, f in src.annotations.items()}
    monkeypatch.setitem(S.SOURCES, "flickr30k", dataclasses.replace(src, annotations=anns))
    monkeypatch.delenv(S.FLICKR30K_IMAGES_ENV, raising=False)


def fetch(fx: Fixture, root: Path, **kw) -> Path:
    kw.setdefault("image_archives", {"flickr30k-images": fx.archive_url})
    kw.setdefault("expected_sizes", fx.sizes)
    return fetch_dataset("flickr30k", root, base_url=fx.base_url, progress=False, retries=1, backoff=0.01, **kw)


@pytest.mark.usefixtures("unpinned_flickr")
def test_fetch_dataset_end_to_end_and_load_split(http_server: FixtureServer, tmp_path: Path) -> None:
    from benchmark.data.karpathy import load_split

    fx = Fixture(http_server)
    ds = fetch(fx, tmp_path)
    assert ds == tmp_path / "flickr30k"
    assert sorted(p.name for p in ds.iterdir()) == [".complete.json", "annotations", "fetch.lock.json",
                                                      "flickr30k-images"]  # archive deleted, no temp dirs
    test = load_split(tmp_path, "flickr30k", "test")
    assert test.n_images == 2 and test.n_captions == 4 and test.captions[0] == "test 301 one"  # pre_caption applied
    assert test.txt2img.tolist() == [0, 0, 1, 1]
    for rel in test.image_paths:
        with Image.open(test.root / rel) as im:
            assert im.size == (8, 6)
    train = load_split(tmp_path, "flickr30k", "train")
    assert train.n_images == 3 and train.n_captions == 6
    lock = json.loads((ds / "fetch.lock.json").read_text())["files"]
    assert set(lock) == {"annotations/flickr30k_train.json", "annotations/flickr30k_val.json",
                         "annotations/flickr30k_test.json", "downloads/flickr30k_images.zip"}
    assert lock["downloads/flickr30k_images.zip"] == {"sha256": sha(fx.archive), "bytes": len(fx.archive),
                                                      "url": fx.archive_url}
    marker = json.loads((ds / ".complete.json").read_text())
    assert marker["sizes"]["test"] == {"images": 2, "captions": 4} and marker["n_images"] == 6

    http_server.reset_counts()
    assert fetch(fx, tmp_path) == ds
    assert http_server.count() == 0  # complete and verified: no request at all


@pytest.mark.usefixtures("unpinned_flickr")
def test_fetch_dataset_tar_archive_from_local_path(http_server: FixtureServer, tmp_path: Path) -> None:
    fx = Fixture(http_server, layout="tar")
    local = tmp_path / "my-flickr.tar.gz"
    local.write_bytes(fx.archive)
    ds = fetch(fx, tmp_path / "root", image_archives={"flickr30k-images": str(local)}, keep_archives=True)
    assert (ds / "flickr30k-images" / "302.png").is_file() and (ds / ".complete.json").is_file()
    assert http_server.count("/img/flickr30k-images.tar.gz") == 0 and local.exists()


@pytest.mark.usefixtures("unpinned_flickr")
def test_lock_file_detects_tampering(http_server: FixtureServer, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    fx = Fixture(http_server)
    ds = fetch(fx, tmp_path)
    ann = ds / "annotations" / "flickr30k_test.json"
    ann.write_text("[]")  # tampered locally
    http_server.reset_counts()
    with caplog.at_level(logging.WARNING):
        fetch(fx, tmp_path)
    assert "does not verify" in caplog.text
    assert json.loads(ann.read_text()) == fx.ann["flickr30k_test.json"]  # restored from the source
    assert http_server.count() == 1 and http_server.count("/ann/flickr30k_test.json") == 1

    ann.write_text("[]")
    http_server.add("/ann/flickr30k_test.json", b"[]\n")  # the upstream file changed: refuse it
    with pytest.raises(ChecksumError, match=r"fetch\.lock\.json"):
        fetch(fx, tmp_path)
    assert not ann.exists() and not (ds / ".complete.json").exists()


@pytest.mark.usefixtures("unpinned_flickr")
def test_missing_image_after_extraction(http_server: FixtureServer, tmp_path: Path) -> None:
    fx = Fixture(http_server, drop_image="302.png")
    with pytest.raises(FetchError, match=r"1 of 6 annotated images are missing") as exc:
        fetch(fx, tmp_path)
    assert str(tmp_path / "flickr30k" / "flickr30k-images" / "302.png") in str(exc.value)
    assert not (tmp_path / "flickr30k" / ".complete.json").exists()


@pytest.mark.usefixtures("unpinned_flickr")
def test_split_size_check(http_server: FixtureServer, tmp_path: Path) -> None:
    fx = Fixture(http_server)
    with pytest.raises(FetchError, match=r"test: expected 1000 images / 5000 captions, found 2 / 4"):
        fetch(fx, tmp_path, expected_sizes="default")
    assert not (tmp_path / "flickr30k" / ".complete.json").exists()
    http_server.reset_counts()
    fetch(fx, tmp_path, expected_sizes=None)  # images are already there: the archive is not fetched again
    assert http_server.count("/img/flickr30k_images.zip") == 0


@pytest.mark.usefixtures("unpinned_flickr")
def test_flickr_images_need_a_source(http_server: FixtureServer, tmp_path: Path) -> None:
    fx = Fixture(http_server)
    with pytest.raises(FetchError, match=r"no source for the image archive 'flickr30k-images'.*Kaggle"):
        fetch(fx, tmp_path, image_archives={})
    with pytest.raises(ValueError, match="unknown image archive"):
        fetch(fx, tmp_path, image_archives={"nope.zip": "x"})


def test_pinned_hash_rejects_wrong_annotation(http_server: FixtureServer, tmp_path: Path) -> None:
    http_server.add("/ann/flickr30k_train.json", b"[]")
    http_server.add("/ann/flickr30k_val.json", b"[" + b" " * 404_169 + b"]")  # the pinned size, other bytes
    with pytest.raises(ChecksumError, match="eed9daa3c88f980fda8a1481b9ebec811e7f8d9d862a79e259e97c2b2a0481c2"):
        fetch_dataset("flickr30k", tmp_path, base_url=http_server.url("/ann"), progress=False, retries=0)
    assert not (tmp_path / "flickr30k" / "annotations" / "flickr30k_val.json").exists()
    http_server.add("/ann/flickr30k_val.json", b"[]")
    with pytest.raises(ChecksumError, match="announces 2 bytes, expected 404171"):
        fetch_dataset("flickr30k", tmp_path, base_url=http_server.url("/ann"), progress=False, retries=0)


def test_shapes_is_generated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmark.data.shapes as shapes

    calls = []
    monkeypatch.setattr(shapes, "generate_shapes", lambda out_dir, seed=0: calls.append((out_dir, seed)) or out_dir)
    assert fetch_dataset("shapes", tmp_path, seed=3) == tmp_path / "shapes"
    assert calls == [(tmp_path / "shapes", 3)]


def test_sources_match_registry_and_reference_sizes() -> None:
    from benchmark.data.datasets import get_dataset_info

    for name, src in S.SOURCES.items():
        assert {k: f.filename for k, f in src.annotations.items()} == get_dataset_info(name).ann_files
        for f in src.annotations.values():
            assert f.url == f"{S.BLIP_BASE_URL}/{f.filename}"
            assert (f.sha256 is None) == (f.bytes is None)
    assert S.SOURCES["coco"].expected_sizes["test"] == S.SplitSize(5000, 25010)
    assert S.SOURCES["flickr30k"].expected_sizes["val"] == S.SplitSize(1014, 5070)
    assert [a.target for a in S.SOURCES["coco"].archives] == ["train2014", "val2014"]
    with pytest.raises(ValueError, match="downloadable: coco, flickr30k"):
        S.get_source("imagenet")


def test_coco_fetches_only_archives_with_missing_images(http_server: FixtureServer, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    src = S.SOURCES["coco"]
    anns = {k: dataclasses.replace(f, sha256=None, bytes=None) for k, f in src.annotations.items()}
    monkeypatch.setitem(S.SOURCES, "coco", dataclasses.replace(src, annotations=anns))
    tr, va = "train2014/COCO_train2014_000000000001.jpg", "val2014/COCO_val2014_000000000002.jpg"
    http_server.add("/ann/coco_karpathy_train.json", json.dumps([{"image": tr, "caption": "a", "image_id": "1"},
                                                                 {"image": va, "caption": "b", "image_id": "2"}]).encode())
    for split in ("val", "test"):
        http_server.add(f"/ann/coco_karpathy_{split}.json", json.dumps([{"image": va, "caption": ["c"] * 5}]).encode())
    train_zip = http_server.add("/zips/train2014.zip", make_zip({tr: image_bytes(1, "JPEG")}))
    val_zip = http_server.add("/zips/val2014.zip", make_zip({va: image_bytes(2, "JPEG")}))
    (tmp_path / "coco" / "val2014").mkdir(parents=True)
    (tmp_path / "coco" / va).write_bytes(image_bytes(2, "JPEG"))  # val images already in place
    ds = fetch_dataset("coco", tmp_path, base_url=http_server.url("/ann"), progress=False, expected_sizes=None,
                       image_archives={"train2014.zip": train_zip, "val2014.zip": val_zip})
    assert (ds / tr).is_file() and (ds / ".complete.json").is_file()
    assert http_server.count("/zips/train2014.zip") == 1 and http_server.count("/zips/val2014.zip") == 0


# ------------------------------------------------------------------------------------- misbehaving servers --

def test_range_ignoring_server_cutting_at_the_same_byte_gives_up(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(96_000, seed=7)
    url = http_server.add("/a.bin", data, ignore_range=True, drop_after=40_000, drop_times=10**9)
    with pytest.raises(FetchError) as exc:
        download(url, tmp_path / "a.bin", retries=3, backoff=0.001, progress=False)
    msg = str(exc.value)
    # attempt 1 reaches byte 40000 (progress); attempts 2-5 restart from 0 and get no further: 4 fruitless in a row
    assert http_server.count() == 5
    assert url in msg and "after 5 attempts" in msg and "ignores HTTP Range" in msg and "byte 40000" in msg
    assert "Fix:" in msg and "max_attempts" in msg and f"put it at {tmp_path / 'a.bin'}" in msg
    assert [r.status for r in http_server.requests] == [200] * 5
    assert not (tmp_path / "a.bin").exists()


def test_wall_time_bounds_retries(http_server: FixtureServer, tmp_path: Path) -> None:
    url = http_server.add("/a.bin", b"x", fail_500=10**9)
    t0 = time.monotonic()
    with pytest.raises(FetchError, match=r"wall-time limit of max_time=0\.3 s") as exc:
        download(url, tmp_path / "a.bin", retries=10**6, backoff=0.02, max_time=0.3, progress=False)
    assert time.monotonic() - t0 < 2.0 and url in str(exc.value)
    assert 2 <= http_server.count() < 20  # back-off 0.02, 0.04, 0.08, ...: a handful of attempts fit in 0.3 s


def test_attempt_limit_bounds_retries_that_make_progress(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(100_000, seed=8)
    url = http_server.add("/a.bin", data, drop_after=1_000, drop_times=10**9)  # 1,000 new bytes per attempt
    with pytest.raises(FetchError, match=r"after 5 attempts \(the limit of max_attempts=5") as exc:
        download(url, tmp_path / "a.bin", retries=1, backoff=0.001, max_attempts=5, progress=False)
    assert http_server.count() == 5 and "rerunning resumes it" in str(exc.value)
    assert (tmp_path / "a.bin.part").stat().st_size == 5_000


@pytest.mark.parametrize("bad", [{"retries": -1}, {"max_attempts": -2}, {"max_time": -1.0}])
def test_retry_policy_validated(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        F.RetryPolicy(**bad)


def test_truncated_close_delimited_body_is_completed_by_a_range_probe(http_server: FixtureServer,
                                                                      tmp_path: Path) -> None:
    data = blob(96_000, seed=9)
    url = http_server.add("/a.bin", data, close_delimited=True, drop_after=30_000)  # looks complete at 30,000
    download(url, tmp_path / "a.bin", progress=False, backoff=0.001)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [(r.range, r.status) for r in http_server.requests] == [(None, 200), ("bytes=30000-", 206)]
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_close_delimited_body_confirmed_by_416(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(20_000, seed=10)
    url = http_server.add("/a.bin", data, close_delimited=True)
    download(url, tmp_path / "a.bin", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == data
    assert [(r.range, r.status) for r in http_server.requests] == [(None, 200), ("bytes=20000-", 416)]


def test_unconfirmable_close_delimited_body_is_refused(http_server: FixtureServer, tmp_path: Path) -> None:
    data = blob(96_000, seed=11)
    url = http_server.add("/a.bin", data, close_delimited=True, ignore_range=True, drop_after=30_000)
    with pytest.raises(FetchError, match="cannot confirm that the download .* is complete") as exc:
        download(url, tmp_path / "a.bin", progress=False, backoff=0.001)
    assert url in str(exc.value) and "local path" in str(exc.value)
    assert list(tmp_path.iterdir()) == []
    # with a pinned hash the same server is fine: the hash vouches for the file
    download(url, tmp_path / "a.bin", sha256=sha(data), progress=False, backoff=0.001)
    assert (tmp_path / "a.bin").read_bytes() == data


@pytest.mark.parametrize("server", [
    pytest.param({"validators": True}, id="etag-changes"),
    pytest.param({"validators": True, "honor_if_range": True}, id="if-range-honoured"),
    pytest.param({"size_changes": True}, id="total-size-changes"),
])
def test_resume_onto_a_changed_remote_file_restarts(http_server: FixtureServer, tmp_path: Path,
                                                    server: dict) -> None:
    old = blob(96_000, seed=12)
    new = blob(96_000 + (500 if server.pop("size_changes", False) else 0), seed=13)
    url = http_server.add("/a.bin", old, drop_after=30_000, changed_data=new, **server)
    download(url, tmp_path / "a.bin", progress=False, backoff=0.001)
    assert (tmp_path / "a.bin").read_bytes() == new  # not old[:30000] + new[30000:]
    reqs = http_server.requests
    assert reqs[0].range is None and reqs[1].range == "bytes=30000-"
    if server.get("validators"):
        assert reqs[1].if_range == f'"{sha(old)[:16]}"'  # the resume names the version its bytes came from
    if server.get("honor_if_range"):
        assert [r.status for r in reqs] == [200, 200]  # the server restarted the file itself
    else:
        assert [(r.range, r.status) for r in reqs] == [(None, 200), ("bytes=30000-", 206), (None, 200)]
    assert leftovers(tmp_path) == []


def test_part_from_an_unknown_version_is_not_resumed_without_a_pinned_hash(http_server: FixtureServer,
                                                                          tmp_path: Path) -> None:
    data = blob(50_000, seed=14)
    url = http_server.add("/a.bin", data)
    (tmp_path / "a.bin.part").write_bytes(b"\0" * 20_000)  # no record of which remote file it came from
    download(url, tmp_path / "a.bin", progress=False)
    assert (tmp_path / "a.bin").read_bytes() == data and [r.range for r in http_server.requests] == [None]


def test_part_recorded_for_another_version_restarts_across_runs(http_server: FixtureServer, tmp_path: Path) -> None:
    old, new = blob(60_000, seed=15), blob(60_000, seed=16)
    url = http_server.add("/a.bin", old, validators=True, drop_after=25_000, drop_times=1)
    with pytest.raises(FetchError):  # run 1 gives up at once, leaving a .part of the old file and its record
        download(url, tmp_path / "a.bin", max_attempts=1, progress=False)
    assert (tmp_path / "a.bin.part").stat().st_size == 25_000 and (tmp_path / "a.bin.part.json").is_file()
    http_server.add("/a.bin", new, validators=True)  # run 2: the remote file changed meanwhile
    http_server.reset_counts()
    download(url, tmp_path / "a.bin", progress=False, backoff=0.001)
    assert (tmp_path / "a.bin").read_bytes() == new
    assert [(r.range, r.status) for r in http_server.requests] == [("bytes=25000-", 206), (None, 200)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


@pytest.mark.usefixtures("unpinned_flickr")
def test_lock_pins_only_complete_consistent_transfers(http_server: FixtureServer, tmp_path: Path) -> None:
    fx = Fixture(http_server)
    good = json.dumps(fx.ann["flickr30k_test.json"], indent=1).encode().ljust(96_000)  # 96,000 bytes of JSON
    http_server.add("/ann/flickr30k_test.json", good, close_delimited=True, ignore_range=True, drop_after=30_000)
    with pytest.raises(FetchError, match="cannot confirm"):
        fetch(fx, tmp_path)
    ds = tmp_path / "flickr30k"
    lock = json.loads((ds / "fetch.lock.json").read_text())["files"]
    assert "annotations/flickr30k_test.json" not in lock and not (ds / "annotations" / "flickr30k_test.json").exists()

    http_server.add("/ann/flickr30k_test.json", good)  # the server behaves again: the right file is accepted
    fetch(fx, tmp_path)
    lock = json.loads((ds / "fetch.lock.json").read_text())["files"]
    assert lock["annotations/flickr30k_test.json"]["sha256"] == sha(good)
    assert lock["annotations/flickr30k_test.json"]["bytes"] == 96_000


@pytest.mark.usefixtures("unpinned_flickr")
def test_lock_checks_size_before_hash_and_names_a_bad_lock_file(http_server: FixtureServer, tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    fx = Fixture(http_server)
    ds = fetch(fx, tmp_path)
    ann = ds / "annotations" / "flickr30k_val.json"
    n = ann.stat().st_size
    ann.write_bytes(ann.read_bytes() + b" ")
    (ds / ".complete.json").unlink()
    with caplog.at_level(logging.WARNING):
        fetch(fx, tmp_path)
    assert f"does not verify (expected {n} bytes, got {n + 1})" in caplog.text  # the size alone decided it
    lock = ds / "fetch.lock.json"
    for text, pattern in [("{not json", "unreadable"), ('{"files": {"a": {"sha256": "xy", "bytes": 1}}}', "'a'")]:
        lock.write_text(text)
        (ds / ".complete.json").unlink(missing_ok=True)
        with pytest.raises(ValueError, match=pattern) as exc:
            fetch(fx, tmp_path)
        assert str(lock) in str(exc.value) and "mmdd fetch" in str(exc.value)


# ------------------------------------------------------------------------------------------ links in archives --

def tar_with(entries: list[tuple[str, bytes, str]]) -> bytes:
    """A tar.gz of (name, type, data-or-linkname) entries; type is a tarfile type constant."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload.decode()
                tf.addfile(info)
    return buf.getvalue()


@pytest.mark.usefixtures("unpinned_flickr")
def test_symlink_that_escapes_once_its_folder_is_moved_is_refused(http_server: FixtureServer,
                                                                  tmp_path: Path) -> None:
    fx = Fixture(http_server, layout="tar")
    nest = "pack/" * 40 + "flickr30k-images/"
    escape = "../" * 41 + "etc/passwd"  # inside the extraction directory where unpacked, /etc/passwd once moved
    entries = [(nest + n, tarfile.REGTYPE, d) for n, d in fx.images.items() if n != "301.jpg"]
    entries.append((nest + "301.jpg", tarfile.SYMTYPE, escape.encode()))
    url = http_server.add("/img/evil.tar.gz", tar_with(entries))
    with pytest.raises(FetchError, match=r"member '(pack/){40}flickr30k-images/301\.jpg' is a symbolic link"):
        fetch(fx, tmp_path, image_archives={"flickr30k-images": url})
    ds = tmp_path / "flickr30k"
    assert not (ds / "flickr30k-images").exists() and not (ds / ".complete.json").exists()
    assert not [p for p in ds.rglob("*") if p.is_symlink()]


@pytest.mark.parametrize("kind, payload, what", [
    (tarfile.LNKTYPE, b"imgs/a.jpg", "a hard link to 'imgs/a.jpg'"),
    (tarfile.CHRTYPE, b"", "a device file"),
    (tarfile.FIFOTYPE, b"", "a device file, FIFO"),
])
def test_tar_hard_links_and_special_files_refused(tmp_path: Path, kind: bytes, payload: bytes, what: str) -> None:
    arc = tmp_path / "x.tar.gz"
    arc.write_bytes(tar_with([("imgs/a.jpg", tarfile.REGTYPE, b"a"), ("imgs/b.jpg", kind, payload)]))
    with pytest.raises(FetchError, match=rf"member 'imgs/b\.jpg' is {re.escape(what)}"):
        extract(arc, tmp_path / "ds", target="imgs")
    assert list((tmp_path / "ds").iterdir()) == []


def test_zip_symlink_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("imgs/a.jpg", b"a")
        link = zipfile.ZipInfo("imgs/b.jpg")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "../../../../etc/passwd")
    arc = tmp_path / "x.zip"
    arc.write_bytes(buf.getvalue())
    with pytest.raises(FetchError, match=r"member 'imgs/b\.jpg' is a symbolic link"):
        extract(arc, tmp_path / "ds", target="imgs")
    assert list((tmp_path / "ds").iterdir()) == []


def test_link_already_in_the_image_folder_is_refused(http_server: FixtureServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    arc = tmp_path / "x.zip"
    arc.write_bytes(make_zip({"imgs/a.jpg": b"a"}))
    (tmp_path / "ds" / "imgs").mkdir(parents=True)
    (tmp_path / "ds" / "imgs" / "old.jpg").symlink_to("/etc/passwd")  # left by an older version or run
    with pytest.raises(FetchError, match=rf"{re.escape(str(tmp_path / 'ds' / 'imgs' / 'old.jpg'))} is a symbolic"):
        extract(arc, tmp_path / "ds", target="imgs")
    # a complete-looking dataset whose annotated image is a link fails the final check as well
    src = S.SOURCES["flickr30k"]
    fx = Fixture(http_server)
    ds = tmp_path / "root" / "flickr30k"
    (ds / "annotations").mkdir(parents=True)
    for name, entries in fx.ann.items():
        (ds / "annotations" / name).write_text(json.dumps(entries))
    (ds / "flickr30k-images").mkdir()
    for name, data in fx.images.items():
        (ds / "flickr30k-images" / name).write_bytes(data)
    check_dataset(ds, src, None)
    (ds / "flickr30k-images" / "301.jpg").unlink()
    (ds / "flickr30k-images" / "301.jpg").symlink_to("/etc/passwd")
    with pytest.raises(FetchError, match=r"1 annotated images .* are symbolic links .*301\.jpg"):
        check_dataset(ds, src, None)


@pytest.mark.parametrize("image", ["../../../../../../../../etc/passwd", "/etc/passwd"])
def test_annotated_image_path_leaving_the_dataset_is_refused(tmp_path: Path, image: str) -> None:
    ds = tmp_path / "flickr30k"
    (ds / "annotations").mkdir(parents=True)
    for f in S.SOURCES["flickr30k"].annotations.values():
        (ds / "annotations" / f.filename).write_text(json.dumps([{"image": image, "caption": ["x"]}]))
    with pytest.raises(FetchError, match=rf"leave the dataset directory \(first: '{re.escape(image)}'\)"):
        check_dataset(ds, S.SOURCES["flickr30k"], None)
