"""Fetch the real datasets: resumable, verified downloads; safe archive extraction; a post-fetch check.

Layout produced for ``<ds>`` in ``<data_root>/<ds>/``::

    annotations/<Karpathy JSON files>    # BLIP release
    <image dirs>/...                      # flickr30k-images/, or train2014/ + val2014/
    fetch.lock.json                       # sha256 + bytes of every file without a pinned hash, recorded after its
                                          # first complete, consistent download (trust on first use)
    .complete.json                        # written last, once every annotated image exists and split sizes match

Every file is written beside its target and renamed into place, so an interrupted run leaves either nothing or a
``*.part`` download, with ``*.part.json`` (the size and validators the server announced), that the next run resumes.
The threat model is in docs/security.md#fetchers.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import stat
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import asdict, astuple, dataclass
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


class _Changed(Exception):
    """The bytes on the server are no longer those the partial download was built from: restart from byte 0."""


@dataclass(frozen=True)
class RetryPolicy:
    """When a download gives up, and how long it waits between attempts.

    It gives up after ``retries + 1`` attempts in a row that bring no byte beyond the furthest reached so far, after
    ``max_attempts`` attempts in all, or when the next retry would start more than ``max_time`` seconds after the
    first request (a transfer in progress is never cut). After the k-th fruitless attempt in a row it waits
    ``backoff * 2**(k-1)`` seconds, at most 60.
    """

    retries: int = 4
    backoff: float = 1.0
    max_attempts: int = 100
    max_time: float = 6 * 3600.0

    def __post_init__(self) -> None:
        for name in ("retries", "backoff", "max_attempts", "max_time"):
            if getattr(self, name) < 0:
                raise ValueError(f"download {name} must be >= 0, got {getattr(self, name)}")

    def delay(self, fruitless: int) -> float:
        return min(self.backoff * 2 ** max(fruitless - 1, 0), 60.0)

    def exhausted(self, attempts: int, fruitless: int, elapsed: float) -> str | None:
        """Why no further attempt is allowed, or ``None``."""
        if fruitless > self.retries:
            return f"{fruitless} attempts in a row brought no new bytes"
        if attempts >= self.max_attempts:
            return f"the limit of max_attempts={self.max_attempts} was reached"
        if elapsed + self.delay(fruitless) > self.max_time:
            return f"the wall-time limit of max_time={self.max_time:g} s was reached"
        return None


@dataclass(frozen=True)
class Transfer:
    """A finished download: its sha256 and size, and whether the server vouched for that size."""

    sha256: str
    size: int
    confirmed: bool  # the server stated the total (or ended a chunked body properly) and every response agreed


@dataclass(frozen=True)
class _Remote:
    """What the server said about the file it sends: total size and validators (kept beside the ``.part``)."""

    total: int | None = None
    etag: str | None = None
    last_modified: str | None = None

    def conflict(self, new: "_Remote") -> str | None:
        """Why bytes described by ``new`` cannot continue bytes received under ``self``, or ``None``."""
        for field, label in (("etag", "ETag"), ("last_modified", "Last-Modified"), ("total", "total size")):
            old_v, new_v = getattr(self, field), getattr(new, field)
            if old_v is not None and new_v is not None and old_v != new_v:
                return f"{label} changed from {old_v!r} to {new_v!r}"
        return None

    def merged(self, new: "_Remote") -> "_Remote":
        return _Remote(*(n if n is not None else o for o, n in zip(astuple(self), astuple(new))))

    def if_range(self) -> str | None:
        """The validator for ``If-Range`` (a weak ETag may not be used there)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


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


def _verify_file(path: Path, sha256: str | None, expected_bytes: int | None) -> str | None:
    """Why ``path`` does not match, or ``None``. The size is checked first: a wrong size costs no read."""
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        return f"expected {expected_bytes} bytes, got {size}"
    return _mismatch(sha256_file(path), size, sha256, None) if sha256 is not None else None


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


def _state_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _load_remote(part: Path, url: str) -> _Remote | None:
    """The server's description recorded when ``part`` was started from ``url``; ``None`` if absent or unreadable."""
    try:
        raw = read_json(_state_path(part))
        if raw["url"] != url:
            return None
        remote = _Remote(raw["total"], raw["etag"], raw["last_modified"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = (remote.total is None or isinstance(remote.total, int)) and all(
        v is None or isinstance(v, str) for v in (remote.etag, remote.last_modified))
    return remote if ok else None


def _save_remote(part: Path, url: str, remote: _Remote) -> None:
    write_json(_state_path(part), {"url": url, **asdict(remote)})


def _discard(part: Path) -> None:
    part.unlink(missing_ok=True)
    _state_path(part).unlink(missing_ok=True)


def _describe(resp: Any, offset: int) -> tuple[_Remote, int]:
    """The server's description of the file and the file byte at which the body starts."""
    headers = resp.headers
    etag, modified = headers.get("ETag"), headers.get("Last-Modified")
    if resp.status == 206:
        content_range = headers.get("Content-Range", "")
        m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range.strip())
        if not m or int(m.group(1)) != offset:
            raise _Dropped(f"server answered an unexpected Content-Range {content_range!r} for offset {offset}")
        return _Remote(None if m.group(3) == "*" else int(m.group(3)), etag, modified), offset
    length = (headers.get("Content-Length") or "").strip()
    return _Remote(int(length) if length.isdigit() else None, etag, modified), 0


def _check_announced(url: str, dest: Path, total: int | None, expected_bytes: int | None) -> None:
    if expected_bytes is not None and total is not None and total != expected_bytes:
        raise ChecksumError(f"size mismatch for {url}: the server announces {total} bytes, expected "
                            f"{expected_bytes}; nothing was downloaded or kept. If it persists the source changed. "
                            f"{_manual(dest)}")


def _stream(resp: Any, part: Path, start: int, total: int | None, desc: str, progress: bool) -> tuple[Any, int]:
    """Write the body into ``part`` from file byte ``start`` (0 truncates); return (sha256 object, part size)."""
    hasher = _hash_prefix(part, start)
    size = start
    try:
        with open(part, "ab" if start else "wb") as f, tqdm(
                total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                desc=desc, disable=not progress, leave=False) as bar:
            while chunk := resp.read(_CHUNK):
                f.write(chunk)
                hasher.update(chunk)
                size += len(chunk)
                bar.update(len(chunk))
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(err, part, total) from None
        if not isinstance(err, _RETRYABLE):
            raise
        raise _Dropped(str(err)) from None
    return hasher, size


def _body_complete(size: int, total: int | None) -> bool:
    """Whether ``size`` bytes are the whole file of the announced ``total`` (``False``: no total announced)."""
    if total is None:
        return False
    if size < total:
        raise _Dropped(f"connection closed after {size} of {total} bytes")
    if size > total:
        raise _Changed(f"received {size} bytes, more than the {total} announced")
    return True


def _after_416(err: HTTPError, part: Path, known: _Remote | None, offset: int) -> Transfer:
    """A 416 to ``Range: bytes=offset-``: the part is complete if the server's size is ``offset``."""
    m = re.fullmatch(r"bytes \*/(\d+)", (err.headers.get("Content-Range", "") if err.headers else "").strip())
    total = int(m.group(1)) if m else None
    if total == offset and (known is None or known.total in (None, total)):
        return Transfer(sha256_file(part), offset, confirmed=True)
    raise _Changed(f"HTTP 416 for a resume at byte {offset} (the server's size is {total})")


@dataclass
class _Tally:
    """The retry loop's bookkeeping for one download."""

    furthest: int                     # the largest size ``.part`` reached: progress means going beyond it
    attempts: int = 0
    fruitless: int = 0                # attempts in a row that did not go beyond ``furthest``
    ignored_range: bool = False       # the server answered a Range request with the whole file
    probed_at: int | None = None      # size at which a body without a stated size ended

    def count(self, size: int) -> None:
        self.fruitless = 0 if size > self.furthest else self.fruitless + 1
        self.furthest = max(self.furthest, size)


def _attempt(url: str, part: Path, dest: Path, tally: _Tally, *, trust_part: bool, expected_bytes: int | None,
             timeout: float, progress: bool) -> Transfer:
    """One request resuming (or restarting) ``part``; notes in ``tally`` when the server ignores Range.

    A ``.part`` is resumed only when the validators of its first response were recorded (or a pinned sha256 will
    check the result): If-Range asks the server to restart if the file changed, and a response whose ETag,
    Last-Modified or total size disagrees with the recorded one raises :class:`_Changed`.
    """
    offset = part.stat().st_size if part.exists() else 0
    known = _load_remote(part, url)
    if offset and known is None and not trust_part:
        log.info("%s: discarding %s: nothing records which version of the remote file it holds", url, part)
        _discard(part)
        offset = 0
    headers = {"User-Agent": f"mmdd-bench/{__version__}"}
    validator = known.if_range() if known is not None else None
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if validator:
            headers["If-Range"] = validator
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            remote, start = _describe(resp, offset)
            conflict = known.conflict(remote) if known is not None and offset else None
            tally.ignored_range |= bool(offset) and start == 0 and conflict is None
            if start and conflict:
                raise _Changed(conflict)
            if offset and not start:
                log.info("%s: server sent the whole file (HTTP %s) instead of resuming at byte %d%s; restarting",
                         url, resp.status, offset, f" ({conflict})" if conflict else "")
            elif start:
                remote = known.merged(remote) if known is not None else remote
            _check_announced(url, dest, remote.total, expected_bytes)
            _save_remote(part, url, remote)
            hasher, size = _stream(resp, part, start, remote.total, dest.name, progress)
            chunked = "chunked" in (resp.headers.get("Transfer-Encoding") or "").lower()
    except HTTPError as err:
        err.close()
        if err.code == 416 and offset:
            return _after_416(err, part, known, offset)
        raise
    confirmed = _body_complete(size, remote.total) or chunked
    return Transfer(hasher.hexdigest(), size, confirmed)


def _give_up(url: str, dest: Path, part: Path, tally: _Tally, why: str, reason: str) -> FetchError:
    hint = (f" The server ignores HTTP Range requests, so every retry restarted from byte 0, and no attempt got "
            f"past byte {tally.furthest}." if tally.ignored_range else "")
    kept = f" The partial download {part} is kept; rerunning resumes it." if part.exists() and not hint else ""
    return FetchError(f"could not download {url}: gave up after {tally.attempts} attempts ({why}; last error: "
                      f"{reason}).{hint}{kept} Fix: rerun later, or allow more with retries / max_attempts / "
                      f"max_time (the config's data.sources.<dataset>, or fetch_dataset arguments). {_manual(dest)}")


def _fetch_into_part(url: str, part: Path, dest: Path, policy: RetryPolicy, *, trust_part: bool,
                     expected_bytes: int | None, timeout: float, progress: bool) -> Transfer:
    """Download ``url`` into ``part`` (resuming what is there), retrying within ``policy``.

    Progress is the furthest size ``part`` ever reached: a restart from byte 0 that gets no further than before is a
    fruitless attempt. A body that ends without a stated size is probed once more with a Range request, which either
    brings the rest, confirms the size (416), or shows that the server cannot confirm it; the transfer then comes back
    unconfirmed.
    """
    started = time.monotonic()
    tally = _Tally(furthest=part.stat().st_size if part.exists() else 0)
    while True:
        tally.attempts += 1
        try:
            transfer = _attempt(url, part, dest, tally, trust_part=trust_part, expected_bytes=expected_bytes,
                                timeout=timeout, progress=progress)
            if (transfer.confirmed or tally.ignored_range or tally.probed_at == transfer.size
                    or tally.attempts >= policy.max_attempts):
                return transfer
            log.info("%s: the body ended after %d bytes without a stated size; asking for more to confirm the end",
                     url, transfer.size)
            tally.probed_at = transfer.size
            tally.count(transfer.size)
            continue
        except HTTPError as err:
            if err.code not in _RETRY_STATUS:
                raise FetchError(f"download of {url} failed: HTTP {err.code} {err.reason}. {_manual(dest)}") from None
            reason = f"HTTP {err.code} {err.reason}"
        except ChecksumError:
            _discard(part)
            raise
        except _Changed as err:
            _discard(part)
            reason = f"the remote file changed ({err}); restarting from byte 0"
        except (_Dropped, *_RETRYABLE) as err:
            reason = f"{type(err).__name__}: {getattr(err, 'reason', None) or err}"
        tally.count(part.stat().st_size if part.exists() else 0)
        why = policy.exhausted(tally.attempts, tally.fruitless, time.monotonic() - started)
        if why:
            raise _give_up(url, dest, part, tally, why, reason)
        delay = policy.delay(tally.fruitless)
        log.warning("%s: %s; attempt %d failed (%d in a row without progress), retrying in %.1fs",
                    url, reason, tally.attempts, tally.fruitless, delay)
        time.sleep(delay)


def _unconfirmed(url: str, dest: Path) -> FetchError:
    return FetchError(f"cannot confirm that the download of {url} is complete: the server states no size "
                      "(no Content-Length or Content-Range) and would not resume to confirm it, so a cut connection "
                      "looks like the end of the file. Nothing was kept or recorded in the lock file. Fix: download "
                      f"it with another tool, check it, and pass its local path instead of the URL. {_manual(dest)}")


def _download(url: str, dest: Path, sha256: str | None, expected_bytes: int | None, *, policy: RetryPolicy,
              timeout: float, progress: bool) -> Transfer | None:
    """:func:`download`, returning the verified transfer (``None`` when an existing file was kept)."""
    if dest.exists():
        if sha256 is None and expected_bytes is None:
            log.info("%s exists (no checksum to verify); skipping download", dest)
            return None
        problem = _verify_file(dest, sha256, expected_bytes)
        if problem is None:
            log.info("%s exists and verifies; skipping download", dest)
            return None
        log.warning("%s exists but does not verify (%s); downloading it again", dest, problem)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    resumed = part.exists() and part.stat().st_size > 0
    while True:
        transfer = _fetch_into_part(url, part, dest, policy, trust_part=sha256 is not None,
                                    expected_bytes=expected_bytes, timeout=timeout, progress=progress)
        problem = _mismatch(transfer.sha256, transfer.size, sha256, expected_bytes)
        if problem is None and not transfer.confirmed and sha256 is None and expected_bytes is None:
            _discard(part)
            raise _unconfirmed(url, dest)
        if problem is None:
            os.replace(part, dest)
            _state_path(part).unlink(missing_ok=True)
            log.info("downloaded %s (%d bytes, sha256 %s)", dest, transfer.size, transfer.sha256)
            return transfer
        _discard(part)
        if resumed:  # a stale .part from an older run may be the culprit: try once from scratch
            log.warning("%s: resumed download does not verify (%s); restarting from byte 0", url, problem)
            resumed = False
            continue
        raise ChecksumError(f"checksum mismatch for {url}: {problem}; the bad download was deleted. "
                            f"Rerun to retry; if it persists the source changed. {_manual(dest)}")


def download(url: str, dest: str | os.PathLike, sha256: str | None = None, expected_bytes: int | None = None,
             retries: int = 4, backoff: float = 1.0, timeout: float = 60.0, progress: bool = True,
             max_attempts: int = 100, max_time: float = 6 * 3600.0) -> Path:
    """Download ``url`` to ``dest``: resumable (HTTP Range into ``dest.part``), retried, verified, atomic.

    * An existing ``dest`` that verifies against ``expected_bytes``/``sha256`` (size first) is kept (no request is
      made); one that does not is downloaded again. Without either, an existing ``dest`` is kept as is.
    * Connection errors, dropped connections, HTTP 5xx/429/408 are retried with exponential back-off within a
      :class:`RetryPolicy` (``retries`` fruitless attempts in a row, ``max_attempts`` in all, ``max_time`` seconds),
      resuming from the bytes already received. A server that ignores ``Range`` (200 instead of 206) restarts the
      file; a restart that gets no further than before counts as fruitless.
    * The size the server announces (Content-Length / Content-Range total) must agree across the first response and
      every resume, and with ``expected_bytes``; a changed ETag / Last-Modified / size restarts from byte 0.
    * Without ``sha256`` or ``expected_bytes``, a body whose size no response states (close-delimited) is refused.
    * On a checksum/size mismatch the download is deleted and :class:`ChecksumError` names expected vs actual.
    * HTTP 404 (or any other non-retryable status), an unreachable host or a full disk raise :class:`FetchError`
      naming the URL and the manual alternative.
    """
    dest = Path(dest)
    policy = RetryPolicy(retries, backoff, max_attempts, max_time)
    _download(url, dest, sha256, expected_bytes, policy=policy, timeout=timeout, progress=progress)
    return dest


# ----------------------------------------------------------------------------------------------------- archives --

def _check_member(name: str, archive: Path) -> None:
    norm = name.replace("\\", "/")
    parts = PurePosixPath(norm).parts
    if norm.startswith("/") or re.match(r"^[A-Za-z]:", norm) or ".." in parts:
        raise FetchError(f"refusing to extract {archive}: member {name!r} would be written outside the target "
                         "directory (path traversal); the archive is corrupt or malicious")


def _refuse(archive: Path, member: str, what: str) -> FetchError:
    return FetchError(f"refusing to extract {archive}: member {member!r} is {what}. Image archives may hold only "
                      "regular files and directories (a link that is harmless where it is unpacked can point "
                      "anywhere once its folder is moved into place); the archive is corrupt or malicious: obtain "
                      "a clean copy")


def _zip_special(info: zipfile.ZipInfo) -> str | None:
    """What a zip member is if not a regular file or directory (from the Unix mode in its external attributes)."""
    kind = stat.S_IFMT(info.external_attr >> 16)
    if kind in (0, stat.S_IFREG, stat.S_IFDIR):
        return None
    return "a symbolic link" if kind == stat.S_IFLNK else f"a special file (mode {kind:#o})"


def _extract_zip(archive: Path, out: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            _check_member(info.filename, archive)
            special = _zip_special(info)
            if special:
                raise _refuse(archive, info.filename, special)
        zf.extractall(out)


def _tar_special(m: tarfile.TarInfo) -> str | None:
    if m.issym():
        return f"a symbolic link to {m.linkname!r}"
    if m.islnk():
        return f"a hard link to {m.linkname!r}"
    if not (m.isfile() or m.isdir()):
        return "a device file, FIFO or other special file"
    return None


def _extract_tar(archive: Path, out: Path) -> None:
    with tarfile.open(archive, "r:*") as tf:
        members = tf.getmembers()
        for m in members:
            _check_member(m.name, archive)
            special = _tar_special(m)
            if special:
                raise _refuse(archive, m.name, special)
        if hasattr(tarfile, "data_filter"):
            tf.extractall(out, members=members, filter="data")
        else:  # Python < 3.11.4: members were checked above
            tf.extractall(out, members=members)


def _reject_links(root: Path) -> None:
    """Raise :class:`FetchError` if anything below ``root`` is a link or special file (``root`` itself may be a
    link the user made, e.g. to another disk)."""
    for dirpath, dirnames, filenames in os.walk(root):  # does not descend into symlinked directories
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                what = "a symbolic link" if stat.S_ISLNK(mode) else "a special file"
                raise FetchError(f"{path} is {what}; image folders may hold only regular files and directories. "
                                 "Delete it and rerun `mmdd fetch`.")


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

    The archive is unpacked into a temporary directory inside ``dest_dir`` (members escaping it, links and special
    files are refused with :class:`FetchError` naming the member), then moved into place: with ``target``, the
    directory that becomes ``dest_dir/target`` (``<tmp>/target`` if it exists, else the directory holding the most
    images, e.g. Kaggle's nested layout); without, every top-level entry is merged into ``dest_dir``. The result is checked again for links (an earlier run or
    version may have left one). Nothing of the archive is left behind on failure. Returns the result path.
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
        _reject_links(tmp)
        if target is not None:
            _merge(_image_dir(tmp, target), dest_dir / target)
            _reject_links(dest_dir / target)
            return dest_dir / target
        for entry in tmp.iterdir():
            _merge(entry, dest_dir / entry.name)
            if (dest_dir / entry.name).is_dir():
                _reject_links(dest_dir / entry.name)
        return dest_dir
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ dataset --

class _Lock:
    """``fetch.lock.json``: sha256 + bytes of files without a pinned hash, recorded after their first complete,
    consistent download (trust on first use) and checked, size first, on every later run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = _read_lock(path) if path.exists() else {"files": {}}

    def get(self, rel: str) -> dict[str, Any] | None:
        return self.data["files"].get(rel)

    def record(self, rel: str, sha256: str, size: int, url: str) -> None:
        self.data["files"][rel] = {"sha256": sha256, "bytes": size, "url": url}
        write_json(self.path, self.data)


def _valid_lock_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
            and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
            and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0)


def _read_lock(path: Path) -> dict[str, Any]:
    """The lock file's data; ``ValueError`` naming the file and the fix if it is unreadable or malformed."""
    fix = (f"restore {path} from a backup, or delete it (every unpinned file is then re-checked only against "
           "its next download) and rerun `mmdd fetch`")
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"lock file {path} is unreadable ({type(err).__name__}: {err}); {fix}") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ValueError(f"lock file {path} has no 'files' mapping; {fix}")
    bad = sorted(rel for rel, entry in files.items() if not _valid_lock_entry(entry))
    if bad:
        raise ValueError(f"lock file {path}: entries {bad} lack a 64-hex 'sha256' or an integer 'bytes'; {fix}")
    return data


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
            problem = _verify_file(local, sha, size)
            if problem:
                raise ChecksumError(f"checksum mismatch for {local}: {problem}")
            with atomic_path(dest) as tmp:
                shutil.copyfile(local, tmp)
            transfer = None
        else:
            transfer = _download(str(spec), dest, sha, size, **dl)
    except ChecksumError as err:
        if pinned_sha is None and entry is not None:
            raise ChecksumError(f"{err} (expected values come from {lock.path}, recorded at the first download; "
                                "if the upstream file changed on purpose, delete its entry there)") from None
        raise
    if pinned_sha is None and entry is None:  # a download reaching here was complete and consistent
        digest = transfer.sha256 if transfer is not None else sha256_file(dest)
        lock.record(rel, digest, dest.stat().st_size, str(spec))


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
        raise FetchError(f"cannot read annotation file {path} ({type(err).__name__}: {err}); delete it and rerun "
                         f"`mmdd fetch {path.parent.parent.name}`") from None
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
    escaping = [p for p in images if PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts]
    if escaping:
        raise FetchError(f"{len(escaping)} image paths in the annotations of {ds_dir} leave the dataset directory "
                         f"(first: {escaping[0]!r}); the annotation files are corrupt or malicious. Delete "
                         f"{ds_dir / 'annotations'} and rerun `mmdd fetch`.")
    missing = _missing(ds_dir, list(images))
    if missing:
        shown = "\n  ".join(str(ds_dir / p) for p in missing[:10])
        raise FetchError(f"{len(missing)} of {len(images)} annotated images are missing under {ds_dir} "
                         f"(first {min(10, len(missing))}):\n  {shown}\nThe image archive may be incomplete or laid "
                         "out differently; paths in the annotations are relative to the dataset directory.")
    links = [p for p in images if (ds_dir / p).is_symlink()]
    if links:
        raise FetchError(f"{len(links)} annotated images under {ds_dir} are symbolic links (first: {ds_dir / links[0]}"
                         "); images must be regular files. Delete them and rerun `mmdd fetch`.")
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
                  timeout: float = 60.0, max_attempts: int = 100, max_time: float = 6 * 3600.0) -> Path:
    """Download, verify and lay out dataset ``name`` under ``<data_root>/<name>``; return that directory.

    * ``base_url`` replaces the BLIP base URL of the annotation files; ``urls`` maps an annotation file name to a
      URL or local path (wins over ``base_url``).
    * ``image_archives`` maps an archive key (``'flickr30k-images'``, ``'train2014.zip'``, ``'val2014.zip'``) to a URL
      or a local archive path. Flickr30k has no public archive URL: pass one here or set ``$MMDD_FLICKR30K_IMAGES``.
      An archive is skipped when every annotated image under its directory already exists.
    * ``expected_sizes``: ``'default'`` (the Karpathy split sizes), ``None`` (no check) or ``{split: (images,
      captions)}``.
    * ``shapes`` is generated locally (``benchmark.data.shapes.generate_shapes``) with ``seed``.
    * ``retries``, ``backoff``, ``max_attempts``, ``max_time``: the :class:`RetryPolicy` of every download.

    A dataset already marked complete whose annotations and images verify is left alone (no network access).
    Raises :class:`FetchError` with the fix on any failure; ``.complete.json`` is written only on success.
    """
    data_root = Path(data_root)
    if name == "shapes":
        return _generate_shapes(data_root, seed)
    source = get_source(name)
    expected = _sizes(expected_sizes, source)
    policy = RetryPolicy(retries, backoff, max_attempts, max_time)
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
    dl = {"policy": policy, "timeout": timeout, "progress": progress}

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
