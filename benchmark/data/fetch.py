"""Fetch the real datasets: resumable, verified downloads; safe archive extraction; a post-fetch check.

Layout produced for ``<ds>`` in ``<data_root>/<ds>/``::

    annotations/<Karpathy JSON files>    # BLIP release
    <image dirs>/...                      # flickr30k-images/, or train2014/ + val2014/
    fetch.lock.json                       # sha256 + bytes of every file without a pinned hash, from its first download
    .complete.json                        # written last, once every annotated image exists and split sizes match

Every file is written beside its target and renamed into place, so an interrupted run leaves either nothing or a
``*.part`` download that the next run resumes.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.error import HTTPError, URLError

from tqdm import tqdm

from benchmark import __version__
from benchmark.data.sources import ArchiveSource, DatasetSource, SplitSize, get_source
from benchmark.io import atomic_path, read_json, write_json

log = logging.getLogger(__name__)

LOCK_FILE = "fetch.lock.json"
COMPLETE_MARKER = ".complete.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_CHUNK = 1 << 20
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_RETRYABLE = (URLError, ConnectionError, TimeoutError, http.client.HTTPException)


class FetchError(RuntimeError):
    """A dataset file could not be fetched or verified; the message says what to do."""


class ChecksumError(FetchError):
    """A downloaded file does not match its expected sha256 / size (the bad file has been deleted)."""


class _Dropped(Exception):
    """The connection closed before the announced body length arrived."""


# ---------------------------------------------------------------------------------------------------- downloads --

def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _mismatch(digest: str, size: int, sha256: str | None, expected_bytes: int | None) -> str | None:
    problems = []
    if expected_bytes is not None and size != expected_bytes:
        problems.append(f"expected {expected_bytes} bytes, got {size}")
    if sha256 is not None and digest != sha256.lower():
        problems.append(f"expected sha256 {sha256.lower()}, got {digest or 'a different file'}")
    return "; ".join(problems) or None


def _manual(dest: Path) -> str:
    return f"Manual alternative: obtain the file yourself and put it at {dest}, then rerun."


def _disk_full(err: OSError, where: Path, need: int | None) -> FetchError:
    need_txt = f" (about {need / 2**30:.1f} GiB needed)" if need else ""
    return FetchError(f"disk full while writing {where}{need_txt}: {err.strerror}. Free space on that file system "
                      f"(or use another data root) and rerun; partial downloads resume.")


def _hash_prefix(path: Path, nbytes: int) -> Any:
    """A sha256 object fed with the first ``nbytes`` (= all) bytes of ``path``."""
    h = hashlib.sha256()
    if nbytes:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h


def _fetch_into_part(url: str, part: Path, dest: Path, *, retries: int, backoff: float, timeout: float,
                     progress: bool) -> tuple[str, int]:
    """Download ``url`` into ``part`` (resuming what is there); return (sha256, bytes)."""
    failures = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        received = offset
        headers = {"User-Agent": f"mmdd-bench/{__version__}"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                if offset and resp.status == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != offset:
                        raise _Dropped(f"server answered an unexpected Content-Range "
                                       f"{resp.headers.get('Content-Range')!r} for offset {offset}")
                elif offset:
                    log.info("%s: server ignored the Range request (HTTP %s); restarting from byte 0", url, resp.status)
                    offset = 0
                total = offset + int(length) if length is not None else None
                hasher = _hash_prefix(part, offset)
                received = offset
                try:
                    with open(part, "ab" if offset else "wb") as f, tqdm(
                            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=dest.name, disable=not progress, leave=False) as bar:
                        while chunk := resp.read(_CHUNK):
                            f.write(chunk)
                            hasher.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                except OSError as err:
                    if err.errno in (errno.ENOSPC, errno.EDQUOT):
                        raise _disk_full(err, part, total) from None
                    if not isinstance(err, _RETRYABLE):
                        raise
                    raise _Dropped(str(err)) from None
                if total is not None and received < total:
                    raise _Dropped(f"connection closed after {received} of {total} bytes")
                return hasher.hexdigest(), received
        except HTTPError as err:
            err.close()
            if err.code == 416 and offset:
                m = re.match(r"bytes \*/(\d+)", err.headers.get("Content-Range", "") if err.headers else "")
                if m and int(m.group(1)) == offset:  # the part file already holds the whole file
                    return sha256_file(part), offset
                log.info("%s: HTTP 416 for a resume at byte %d; restarting from byte 0", url, offset)
                part.unlink()
                continue
            if err.code not in _RETRY_STATUS:
                raise FetchError(f"download of {url} failed: HTTP {err.code} {err.reason}. {_manual(dest)}") from None
            reason = f"HTTP {err.code} {err.reason}"
        except (_Dropped, *_RETRYABLE) as err:
            reason = f"{type(err).__name__}: {getattr(err, 'reason', None) or err}"
            if received > offset:  # the attempt made progress: only consecutive fruitless attempts count
                failures = 0
        failures += 1
        if failures > retries:
            kept = f" The partial download {part} is kept; rerunning resumes it." if part.exists() else ""
            raise FetchError(f"could not download {url} after {failures} attempts (last error: {reason}). "
                             f"{_manual(dest)}{kept}")
        delay = backoff * 2 ** (failures - 1)
        log.warning("%s: %s; retry %d/%d in %.1fs", url, reason, failures, retries, delay)
        time.sleep(delay)


def _download(url: str, dest: Path, sha256: str | None, expected_bytes: int | None, *, retries: int,
              backoff: float, timeout: float, progress: bool) -> str | None:
    """:func:`download`, returning the sha256 it computed (``None`` when an unverifiable file was kept as is)."""
    if dest.exists():
        if sha256 is None and expected_bytes is None:
            log.info("%s exists (no checksum to verify); skipping download", dest)
            return None
        digest = sha256_file(dest) if sha256 is not None else ""
        problem = _mismatch(digest, dest.stat().st_size, sha256, expected_bytes)
        if problem is None:
            log.info("%s exists and verifies; skipping download", dest)
            return digest or None
        log.warning("%s exists but does not verify (%s); downloading it again", dest, problem)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    while True:
        digest, size = _fetch_into_part(url, part, dest, retries=retries, backoff=backoff, timeout=timeout,
                                        progress=progress)
        problem = _mismatch(digest, size, sha256, expected_bytes)
        if problem is None:
            os.replace(part, dest)
            log.info("downloaded %s (%d bytes, sha256 %s)", dest, size, digest)
            return digest
        part.unlink(missing_ok=True)
        if resumed:  # a stale .part from an older run may be the culprit: try once from scratch
            log.warning("%s: resumed download does not verify (%s); restarting from byte 0", url, problem)
            resumed = False
            continue
        raise ChecksumError(f"checksum mismatch for {url}: {problem}; the bad download was deleted. "
                            f"Rerun to retry; if it persists the source changed. {_manual(dest)}")


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, expected_bytes: int | None = None,
             retries: int = 4, backoff: float = 1.0, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``: resumable (HTTP Range into ``dest.part``), retried, verified, atomic.

    * An existing ``dest`` that verifies against ``sha256``/``expected_bytes`` is kept (no request is made); one
      that does not is downloaded again. Without either, an existing ``dest`` is kept as is.
    * Connection errors, dropped connections, HTTP 5xx/429/408 are retried with exponential back-off
      (``backoff * 2**i`` seconds), resuming from the bytes already received; it gives up after ``retries``
      consecutive retries that brought no new bytes. A server that ignores
      ``Range`` (200 instead of 206) restarts the file cleanly.
    * On a checksum/size mismatch the download is deleted and :class:`ChecksumError` names expected vs actual.
    * HTTP 404 (or any other non-retryable status), an unreachable host or a full disk raise :class:`FetchError`
      naming the URL and the manual alternative.
    """
    dest = Path(dest)
    _download(url, dest, sha256, expected_bytes, retries=retries, backoff=backoff, timeout=timeout, progress=progress)
    return dest


# ----------------------------------------------------------------------------------------------------- archives --

def _check_member(name: str, archive: Path) -> None:
    norm = name.replace("\\", "/")
    parts = PurePosixPath(norm).parts
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in parts:
        raise FetchError(f"refusing to extract {archive}: member {name!r} would be written outside the target "
                         "directory (path traversal); the archive is corrupt or malicious")


def _extract_zip(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member(info.filename, archive)
        zf.extractall(out)


def _extract_tar(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            _check_member(m.name, archive)
            if m.issym() or m.islnk():
                if m.linkname.startswith("/"):
                    raise FetchError(f"refusing to extract {archive}: link {m.name!r} -> {m.linkname!r} is absolute")
                target = posixpath.join(posixpath.dirname(m.name), m.linkname) if m.issym() else m.linkname
                if posixpath.normpath(target).split("/")[0] == "..":
                    raise FetchError(f"refusing to extract {archive}: link {m.name!r} -> {m.linkname!r} points "
                                     "outside the target directory (path traversal)")
            elif not (m.isfile() or m.isdir()):
                raise FetchError(f"refusing to extract {archive}: member {m.name!r} is not a file or directory")
        if hasattr(tarfile, "data_filter"):
            tf.extractall(out, members=members, filter="data")
        else:  # Python < 3.11.4: members were checked above
            tf.extractall(out, members=members)


def _image_dir(root: Path, target: str) -> Path:
    """The directory of ``root`` that becomes ``target``: ``root/target`` if present, else the one with most images."""
    if (root / target).is_dir():
        return root / target
    best, best_n = None, 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__MACOSX"))]
        n = sum(1 for f in filenames if f.lower().endswith(IMAGE_SUFFIXES))
        if n > best_n:
            best, best_n = Path(dirpath), n
    if best is None:
        raise FetchError(f"the archive holds no directory named {target!r} and no image files")
    log.info("using %s (%d images) as %s", best.relative_to(root) if best != root else ".", best_n, target)
    return best


def _merge(src: Path, dst: Path) -> None:
    """Move ``src`` onto ``dst``: one atomic rename if ``dst`` is absent, else file by file (files are replaced)."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if not (src.is_dir() and dst.is_dir()):
        os.replace(src, dst)
        return
    for dirpath, _, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in filenames:
            os.replace(Path(dirpath) / f, dst / rel / f)


def extract(archive: str | os.PathLike, dest_dir: str | os.PathLike, target: str | None = None) -> Path:
    """Extract a .zip or .tar(.gz/.bz2/.xz) archive into ``dest_dir`` safely and (per directory) atomically.

    The archive is unpacked into a temporary directory inside ``dest_dir`` (members escaping it are refused with
    :class:`FetchError`), then moved into place: with ``target``, the directory that becomes ``dest_dir/target``
    (``<tmp>/target`` if it exists, else the directory holding the most images, e.g. Kaggle's nested layout); without,
    every top-level entry is merged into ``dest_dir``. Nothing is left behind on failure. Returns the result path.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise FetchError(f"archive {archive} does not exist")
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    try:
        try:
            if zipfile.is_zipfile(archive):
                _extract_zip(archive, tmp)
            elif tarfile.is_tarfile(archive):
                _extract_tar(archive, tmp)
            else:
                raise FetchError(f"{archive} is neither a zip nor a tar archive")
        except (zipfile.BadZipFile, tarfile.TarError, EOFError) as err:
            raise FetchError(f"{archive} is corrupt ({err}); delete it and rerun") from None
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise FetchError(f"disk full while extracting {archive} into {dest_dir}: {err.strerror}. "
                                 "Free space and rerun.") from None
            raise
        if target is not None:
            _merge(_image_dir(tmp, target), dest_dir / target)
            return dest_dir / target
        for entry in tmp.iterdir():
            _merge(entry, dest_dir / entry.name)
        return dest_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ dataset --

class _Lock:
    """``fetch.lock.json``: sha256 + bytes of files without a pinned hash, recorded at their first download."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = read_json(path) if path.exists() else {"files": {}}
        self.data.setdefault("files", {})

    def get(self, rel: str) -> dict[str, Any] | None:
        return self.data["files"].get(rel)

    def record(self, rel: str, sha256: str, size: int, url: str) -> None:
        self.data["files"][rel] = {"sha256": sha256, "bytes": size, "url": url}
        write_json(self.path, self.data)


def _local_path(spec: str | os.PathLike) -> Path | None:
    """A local path for ``spec`` (a path or file:// URL), or ``None`` for a remote URL."""
    if isinstance(spec, os.PathLike):
        return Path(spec)
    parsed = urllib.parse.urlparse(spec)
    if parsed.scheme in ("http", "https", "ftp"):
        return None
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(spec)


def _get_file(spec: str | os.PathLike, dest: Path, *, pinned_sha: str | None, pinned_bytes: int | None,
              lock: _Lock, rel: str, dl: dict[str, Any]) -> None:
    """Put the file ``spec`` (URL or local path) at ``dest``, verified against the pinned hash or the lock file."""
    entry = lock.get(rel)
    sha = pinned_sha or (entry or {}).get("sha256")
    size = pinned_bytes if pinned_bytes is not None else (entry or {}).get("bytes")
    local = _local_path(spec)
    try:
        if local is not None:
            if not local.is_file():
                raise FetchError(f"{local} does not exist. {_manual(dest)}")
            problem = _mismatch(sha256_file(local) if sha else "", local.stat().st_size, sha, size)
            if problem:
                raise ChecksumError(f"checksum mismatch for {local}: {problem}")
            with atomic_path(dest) as tmp:
                shutil.copyfile(local, tmp)
            digest = None
        else:
            digest = _download(str(spec), dest, sha, size, **dl)
    except ChecksumError as err:
        if pinned_sha is None and entry is not None:
            raise ChecksumError(f"{err} (expected values come from {lock.path}, recorded at the first download; "
                                "if the upstream file changed on purpose, delete its entry there)") from None
        raise
    if pinned_sha is None and entry is None:
        lock.record(rel, digest or sha256_file(dest), dest.stat().st_size, str(spec))


def _scan(path: Path) -> tuple[list[str], int]:
    """Image paths (unique, in order) and caption count of a Karpathy-format annotation file."""
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        images: dict[str, None] = {}
        captions = 0
        for e in entries:
            images[e["image"]] = None
            captions += len(e["caption"]) if isinstance(e["caption"], list) else 1
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FetchError(f"cannot read annotation file {path} ({type(err).__name__}: {err}); delete it and rerun") \
            from None
    return list(images), captions


def _sizes(expected: Any, source: DatasetSource) -> dict[str, SplitSize] | None:
    if expected is None:
        return None
    if isinstance(expected, str):
        if expected != "default":
            raise ValueError(f"expected_sizes must be 'default', None or a mapping, got {expected!r}")
        return dict(source.expected_sizes)
    out = {}
    for split, v in expected.items():
        out[split] = v if isinstance(v, SplitSize) else SplitSize(**v) if isinstance(v, Mapping) else SplitSize(*v)
    return out


def _missing(ds_dir: Path, images: list[str]) -> list[str]:
    return [p for p in images if not (ds_dir / p).is_file()]


def check_dataset(ds_dir: str | os.PathLike, source: DatasetSource,
                  expected_sizes: Mapping[str, SplitSize] | None) -> dict[str, Any]:
    """Check that every annotated image exists and split sizes match; return a summary or raise :class:`FetchError`."""
    ds_dir = Path(ds_dir)
    sizes: dict[str, dict[str, int]] = {}
    images: dict[str, None] = {}
    for split, f in source.annotations.items():
        imgs, n_caps = _scan(ds_dir / "annotations" / f.filename)
        sizes[split] = {"images": len(imgs), "captions": n_caps}
        images.update(dict.fromkeys(imgs))
    missing = _missing(ds_dir, list(images))
    if missing:
        shown = "\n  ".join(str(ds_dir / p) for p in missing[:10])
        raise FetchError(f"{len(missing)} of {len(images)} annotated images are missing under {ds_dir} "
                         f"(first {min(10, len(missing))}):\n  {shown}\nThe image archive may be incomplete or laid "
                         "out differently; paths in the annotations are relative to the dataset directory.")
    bad = [f"{split}: expected {exp.images} images / {exp.captions} captions, found "
           f"{sizes[split]['images']} / {sizes[split]['captions']}"
           for split, exp in (expected_sizes or {}).items()
           if split in sizes and (sizes[split]["images"], sizes[split]["captions"]) != (exp.images, exp.captions)]
    if bad:
        raise FetchError(f"{source.name} split sizes do not match the Karpathy splits: " + "; ".join(bad))
    return {"sizes": sizes, "n_images": len(images)}


def _is_complete(ds_dir: Path, source: DatasetSource, expected: Mapping[str, SplitSize] | None) -> bool:
    marker = ds_dir / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        recorded = read_json(marker)["annotations"]
        for f in source.annotations.values():
            path = ds_dir / "annotations" / f.filename
            if not path.is_file() or sha256_file(path) != recorded.get(f.filename):
                raise FetchError(f"{path} is missing or changed since the dataset was completed")
        check_dataset(ds_dir, source, expected)
    except (FetchError, OSError, ValueError, KeyError) as err:
        log.warning("%s was marked complete but does not verify (%s); fetching again", ds_dir, err)
        return False
    return True


def _archive_spec(arc: ArchiveSource, overrides: Mapping[str, str | os.PathLike]) -> str | os.PathLike:
    spec = overrides.get(arc.key) or (os.environ.get(arc.env) if arc.env else None) or arc.url
    if not spec:
        raise FetchError(f"no source for the image archive {arc.key!r}. {arc.manual}")
    return spec


def _generate_shapes(data_root: Path, seed: int) -> Path:
    try:
        from benchmark.data.shapes import generate_shapes
    except ImportError as err:
        raise FetchError(f"the shapes generator is unavailable ({err})") from err
    return Path(generate_shapes(data_root / "shapes", seed=seed))


def fetch_dataset(name: str, data_root: str | os.PathLike, *, base_url: str | None = None,
                  urls: Mapping[str, str | os.PathLike] | None = None,
                  image_archives: Mapping[str, str | os.PathLike] | None = None,
                  expected_sizes: str | Mapping[str, Any] | None = "default", progress: bool = True,
                  keep_archives: bool = False, seed: int = 0, retries: int = 4, backoff: float = 1.0,
                  timeout: float = 60.0) -> Path:
    """Download, verify and lay out dataset ``name`` under ``<data_root>/<name>``; return that directory.

    * ``base_url`` replaces the BLIP base URL of the annotation files; ``urls`` maps an annotation file name to a
      URL or local path (wins over ``base_url``).
    * ``image_archives`` maps an archive key (``'flickr30k-images'``, ``'train2014.zip'``, ``'val2014.zip'``) to a URL
      or a local archive path. Flickr30k has no public archive URL: pass one here or set ``$MMDD_FLICKR30K_IMAGES``.
      An archive is skipped when every annotated image under its directory already exists.
    * ``expected_sizes``: ``'default'`` (the Karpathy split sizes), ``None`` (no check) or ``{split: (images,
      captions)}``.
    * ``shapes`` is generated locally (``benchmark.data.shapes.generate_shapes``) with ``seed``.

    A dataset already marked complete whose annotations and images verify is left alone (no network access).
    Raises :class:`FetchError` with the fix on any failure; ``.complete.json`` is written only on success.
    """
    data_root = Path(data_root)
    if name == "shapes":
        return _generate_shapes(data_root, seed)
    source = get_source(name)
    expected = _sizes(expected_sizes, source)
    overrides = dict(image_archives or {})
    unknown = set(overrides) - {a.key for a in source.archives}
    if unknown:
        raise ValueError(f"unknown image archive key(s) {sorted(unknown)} for {name}; "
                         f"valid: {[a.key for a in source.archives]}")
    ds_dir = data_root / name
    if _is_complete(ds_dir, source, expected):
        log.info("%s is complete and verified at %s; nothing to do", name, ds_dir)
        return ds_dir
    ds_dir.mkdir(parents=True, exist_ok=True)
    (ds_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    for stale in ds_dir.glob(".extract-*"):  # left by an interrupted extraction
        shutil.rmtree(stale, ignore_errors=True)
    lock = _Lock(ds_dir / LOCK_FILE)
    dl = {"retries": retries, "backoff": backoff, "timeout": timeout, "progress": progress}

    ann_hashes: dict[str, str] = {}
    images: list[str] = []
    for f in source.annotations.values():
        spec = (urls or {}).get(f.filename) or (f"{base_url.rstrip('/')}/{f.filename}" if base_url else f.url)
        dest = ds_dir / "annotations" / f.filename
        _get_file(spec, dest, pinned_sha=f.sha256, pinned_bytes=f.bytes, lock=lock, rel=f"annotations/{f.filename}",
                  dl=dl)
        ann_hashes[f.filename] = sha256_file(dest)
        images += _scan(dest)[0]

    missing = _missing(ds_dir, list(dict.fromkeys(images)))
    for arc in source.archives:
        todo = [p for p in missing if PurePosixPath(p).parts[0] == arc.target]
        if not todo:
            log.info("%s: all images under %s/ present; skipping %s", name, arc.target, arc.key)
            continue
        log.info("%s: %d images under %s/ missing; fetching %s", name, len(todo), arc.target, arc.key)
        spec = _archive_spec(arc, overrides)
        local = _local_path(spec)
        if local is not None:
            if not local.is_file():
                raise FetchError(f"image archive {local} does not exist. {arc.manual}")
            extract(local, ds_dir, target=arc.target)
            continue
        filename = PurePosixPath(urllib.parse.urlparse(str(spec)).path).name or arc.key
        path = ds_dir / "downloads" / filename
        _get_file(spec, path, pinned_sha=arc.sha256, pinned_bytes=arc.bytes, lock=lock, rel=f"downloads/{filename}",
                  dl=dl)
        extract(path, ds_dir, target=arc.target)
        if not keep_archives:
            path.unlink()
            if not any(path.parent.iterdir()):
                path.parent.rmdir()

    summary = check_dataset(ds_dir, source, expected)
    write_json(ds_dir / COMPLETE_MARKER, {"dataset": name, "annotations": ann_hashes, **summary,
                                          "mmdd_bench": __version__})
    log.info("%s ready at %s (%d images)", name, ds_dir, summary["n_images"])
    return ds_dir
