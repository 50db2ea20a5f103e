"""Reading what a method process left in its output directory, without trusting it.

A container writes ``/out`` (the host's ``<cell>/.container``) as it likes: files there may be symbolic links to
host files, hard links, FIFOs or devices, or huge. The harness therefore only ever *copies bytes* out of it, one
named file at a time: opened with ``O_NOFOLLOW`` relative to the directory's descriptor, accepted only when
``fstat`` says it is a regular file with a single link and at most the size cap. It never renames or moves a file
of that directory into the results, and never follows a link found there.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from benchmark.distilled import DistilledSet
from benchmark.io import atomic_path

JSON_MAX_BYTES = 16 << 20  # distilled.json: scalars and provenance only
LOG_MAX_BYTES = 64 << 20  # distill_log.jsonl


class RejectedOutput(ValueError):
    """A file of the method's output directory is not acceptable; the message names the rule and the file."""


def read_regular(directory: Path, name: str, max_bytes: int) -> bytes:
    """The bytes of ``directory/name`` if it is a regular, singly linked file of at most ``max_bytes``."""
    where = Path(directory) / name
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # the name is a symbolic link
                raise RejectedOutput(f"rule 'regular-file': {where} is a symbolic link; a method must write its "
                                     "outputs as regular files") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RejectedOutput(f"rule 'regular-file': {where} is not a regular file (mode {st.st_mode:o})")
        if st.st_nlink > 1:
            raise RejectedOutput(f"rule 'regular-file': {where} has {st.st_nlink} hard links; a method must write "
                                 "its outputs as new files")
        if st.st_size > max_bytes:
            raise RejectedOutput(f"rule 'size': {where} holds {st.st_size} bytes, over the cap of {max_bytes}")
        data = _read_at_most(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # grew while we read it
        raise RejectedOutput(f"rule 'size': {where} holds more than the cap of {max_bytes} bytes")
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks, total = [], 0
    while total < limit:
        chunk = os.read(fd, min(1 << 20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def copy_regular(directory: Path, name: str, dest: Path, max_bytes: int) -> Path:
    """Copy an accepted file's bytes to ``dest`` (atomically); the source is left where it is."""
    data = read_regular(directory, name, max_bytes)
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def collect_set(out_dir: Path, log_dest: Path, max_bytes: int) -> DistilledSet:
    """The raw DistilledSet a method process left in ``out_dir`` (copied, then parsed from the copies) and its
    ``distill_log.jsonl`` copied to ``log_dest`` when present."""
    with tempfile.TemporaryDirectory(prefix="mmdd-accept-") as tmp:
        for name, cap in (("distilled.safetensors", max_bytes), ("distilled.json", JSON_MAX_BYTES)):
            try:
                copy_regular(out_dir, name, Path(tmp) / name, cap)
            except FileNotFoundError:
                raise RejectedOutput(f"rule 'outputs': the method finished without writing {name} to its output "
                                     "directory") from None
        dset = DistilledSet.load(Path(tmp) / "distilled")
    try:
        data = read_regular(out_dir, "distill_log.jsonl", LOG_MAX_BYTES)
    except FileNotFoundError:
        return dset
    check_jsonl(data, "distill_log.jsonl")
    with atomic_path(log_dest) as tmp_log:
        tmp_log.write_bytes(data)
    return dset


def check_jsonl(data: bytes, where: str) -> None:
    """Every non-empty line a JSON object (what :func:`benchmark.pipeline.read_history` expects)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RejectedOutput(f"rule 'log': {where} is not UTF-8 text") from None
    for k, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RejectedOutput(f"rule 'log': {where} line {k} is not JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise RejectedOutput(f"rule 'log': {where} line {k} is a {type(row).__name__}, not a JSON object")


@dataclass(frozen=True)
class Usage:
    bytes: int
    entries: int


def usage(root: Path, max_entries: int) -> Usage:
    """Bytes (the larger of apparent size and allocated blocks) and entries under ``root``, links not followed;
    stops counting once ``max_entries`` is passed."""
    total, entries, stack = 0, 0, [Path(root)]
    while stack and entries <= max_entries:
        try:
            it = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        with it:
            for e in it:
                entries += 1
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                total += max(st.st_size, st.st_blocks * 512)
                if stat.S_ISDIR(st.st_mode):
                    stack.append(Path(e.path))
    return Usage(total, entries)
