"""DVC's record of the pipeline, opened once per sweep in the driver: the stage graph, which stages are stale, and
recording finished stages in ``dvc.lock``, all through DVC's Python API on one loaded index.

Why not the ``dvc`` command line per call: every ``dvc status``/``dvc commit`` process re-imports DVC, re-parses
``dvc.yaml``, ``dvc.lock`` and ``params.yaml`` (once per targeted stage) and rewrites the whole lock file per
target; on the quick grid that is ~8 s per committed stage and minutes for a targeted ``dvc status`` of every stage.
Here the index is built once, status and commit run on its stage objects under DVC's repository lock, and a batch
of committed stages is written into ``dvc.lock`` in one go: each stage's entry is rendered by DVC's own serializer
and dumper and replaces that stage's block of lines (or is appended), which is what DVC's round-trip rewrite of the
whole file produces, without re-parsing the other stages' entries.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

import yaml

from benchmark.sweep.files import atomic_write_text
from benchmark.sweep.stages import Stage, SweepError

log = logging.getLogger(__name__)


class Ledger:
    """The project's DVC repository, its command stages loaded once; ``seconds`` sums the time spent in DVC."""

    def __init__(self, root: Path):
        if not (root / "dvc.yaml").exists():
            raise SweepError(f"{root} has no dvc.yaml: run the sweep from the project directory or pass --project")
        from dvc.exceptions import DvcException
        from dvc.repo import Repo

        t0 = time.perf_counter()
        self.root = root
        logging.getLogger("dvc").setLevel(logging.ERROR)  # as `dvc commit --quiet`: no per-output warnings
        try:
            self.repo = Repo(str(root))
            index = self.repo.index
            self._stages = {s.addressing: s for s in index.stages if s.cmd}
            self.pipeline = _pipeline(root, index.graph, self._stages)
        except DvcException as exc:
            raise SweepError(f"DVC cannot read the pipeline in {root}: {exc} (check dvc.yaml and params.yaml; "
                             "`mmdd init-params` writes params.yaml)") from exc
        self.seconds = time.perf_counter() - t0

    def stale(self, names: Iterable[str]) -> set[str]:
        """Which of ``names`` DVC reports as changed (deps, outs, params or command), as ``dvc status`` would."""
        names = list(names)
        if not names:
            return set()
        from dvc.exceptions import DvcException

        t0 = time.perf_counter()
        try:
            with self.repo.lock:
                return {n for n in names if self._stages[n].status(check_updates=True)}
        except DvcException as exc:
            raise SweepError(f"DVC status failed in {self.root}: {exc}") from exc
        finally:
            self.seconds += time.perf_counter() - t0

    def commit(self, names: list[str]) -> dict[str, str]:
        """Record finished stages as ``dvc commit --force`` does; returns the error of each stage that failed."""
        if not names:
            return {}
        from dvc.exceptions import DvcException

        t0 = time.perf_counter()
        errors, saved = {}, []
        try:
            with self.repo.lock:
                for name in names:
                    stage = self._stages[name]
                    try:
                        stage.save()
                        stage.commit(relink=True)
                        saved.append(stage)
                    except (DvcException, OSError) as exc:
                        errors[name] = f"dvc commit failed: {exc}"
                _dump(saved)
        except DvcException as exc:  # the repository lock is held by another dvc process
            return {n: f"dvc commit failed: {exc}" for n in names}
        finally:
            self.seconds += time.perf_counter() - t0
        return errors

    def close(self) -> None:
        self.repo.close()


def _pipeline(root: Path, graph, stages: dict) -> dict[str, Stage]:
    """The sweep's view of each command stage, in ``dvc.yaml`` order."""
    out = {}
    for name, s in stages.items():
        cmd = " && ".join(s.cmd) if isinstance(s.cmd, list) else s.cmd
        upstream = tuple(sorted(u.addressing for u in graph.successors(s) if u.addressing in stages))
        outs = tuple(os.path.relpath(o.fs_path, root) for o in s.outs)
        out[name] = Stage(name, cmd, os.path.relpath(s.wdir, root), upstream, outs)
    return out


def _dump(stages: list) -> None:
    """Write the lock entries of ``stages`` (saved DVC stage objects), one write per lock file."""
    by_file: dict[Path, list] = {}
    for stage in stages:
        by_file.setdefault(Path(os.path.splitext(stage.dvcfile.path)[0] + ".lock"), []).append(stage)
    for path, group in by_file.items():
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        new = splice_lock(text, [render_entry(s) for s in group])
        if new is None:  # a layout this splice does not know: DVC rewrites the file itself
            log.debug("%s: unexpected layout, letting DVC rewrite it", path)
            group[0].dvcfile.dump_stages(group, update_pipeline=False)
        elif new != text:
            atomic_write_text(path, new)


def render_entry(stage) -> str:
    """One stage's lock entry as DVC writes it inside ``stages:`` (lines indented by two spaces)."""
    from dvc.stage.serialize import to_lockfile
    from dvc.utils.serialize import dumps_yaml

    text = dumps_yaml({"stages": to_lockfile(stage)})
    head, _, body = text.partition("\n")
    if head != "stages:":
        raise SweepError(f"unexpected lock entry rendering for {stage.addressing}: {head!r}")
    return body


def _key(header: str) -> str | None:
    """The stage name of a ``  name:`` line (quoted or plain YAML scalar), or None for anything else."""
    try:
        doc = yaml.safe_load(header)
    except yaml.YAMLError:
        return None
    if isinstance(doc, dict) and len(doc) == 1:
        (key, value), = doc.items()
        return key if isinstance(key, str) and value is None else None
    return None


def _blocks(lines: list[str], first: int) -> tuple[dict[str, tuple[int, int]], int] | None:
    """Each stage's line range within the ``stages:`` mapping starting at ``first``, and where that mapping ends."""
    blocks: dict[str, tuple[int, int]] = {}
    current, start, i = None, first, first
    for i in range(first, len(lines) + 1):
        line = lines[i] if i < len(lines) else ""
        top = i == len(lines) or (line and not line.startswith(" "))
        entry = line.startswith("  ") and not line.startswith("   ") and not line.startswith("  -")
        if top or entry:
            if current is not None:
                blocks[current] = (start, i)
            if top:
                return blocks, i
            current, start = _key(line), i
            if current is None or current in blocks:
                return None
        elif current is None and line.strip():
            return None
    return blocks, len(lines)


def splice_lock(text: str, entries: list[str]) -> str | None:
    """``text`` (a ``dvc.lock``) with each rendered entry replacing that stage's block, or appended to ``stages``;
    None when the file is laid out in a way DVC's dumper would not produce."""
    if not text.strip():
        text = "schema: '2.0'\nstages:\n"
    lines = text.splitlines(keepends=True)
    if not text.endswith("\n"):
        return None
    try:
        first = lines.index("stages:\n") + 1
    except ValueError:
        return None
    found = _blocks(lines, first)
    if found is None:
        return None
    blocks, end = found
    appended: list[str] = []
    replaced: dict[int, tuple[int, list[str]]] = {}
    for entry in entries:
        new = entry.splitlines(keepends=True)
        key = _key(new[0])
        if key in blocks:
            start, stop = blocks[key]
            replaced[start] = (stop, new)
        else:
            appended += new
    out, i = [], 0
    while i < len(lines):
        if i == end:
            out += appended
            appended = []
        if i in replaced:
            stop, new = replaced[i]
            out += new
            i = stop
            continue
        out.append(lines[i])
        i += 1
    return "".join(out + appended)
