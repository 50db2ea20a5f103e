"""PTM-ST shortcut (convexified) trajectories, docs/methods.md#shortcut-teachers — built, stored compactly, and read.

For an expert trajectory θ(e) and a segment ``start..end`` (both epochs **inclusive**, K = end − start steps), every
parameter tensor l (each weight, bias, gain) gets

    d_l(p) = ‖θ_l(start+p+1) − θ_l(start+p)‖₂                       p = 0..K−1
    β_l(t) = Σ_{p < t−start} d_l(p) / Σ_{p < K} d_l(p)            t = start..end   (β = 0 where the total is 0)
    θ̃_l(t) = (1 − β_l(t)) θ_l(start) + β_l(t) θ_l(end)

so both endpoints are kept exactly, the intermediate points lie on the segment, and β_l is non-decreasing.

On disk, one ``shortcut_{index:03d}.safetensors`` per expert holds only ``{tower}.start``, ``{tower}.end`` (float32,
copied bit for bit from the expert) and ``{tower}.beta`` (float64, ``[layers, K+1]``) — never per-epoch copies — with
the JSON metadata in the header and in a sidecar. :class:`ShortcutTrajectory` yields θ̃(t) on demand. Files are
written and verified like expert files (:func:`benchmark.experts.store.write_checked`): per-tensor sha256 checked on
first read, the sidecar (written last) holds the file's sha256 and the source expert's.

Layer boundaries come from the expert metadata (``param_names``/``shapes`` per tower, or ``layer_numels``) or from an
explicit ``layer_numels`` argument (e.g. :meth:`benchmark.models.student.FlatStudent.layer_slices`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmark.experts.store import (TOWERS, ExpertCollection, ExpertTrajectory, content_problem, indexed_files,
                                     open_checked, read_checked, recorded_sha256, write_checked)

log = logging.getLogger(__name__)

FORMAT = "mmdd-shortcut"
FORMAT_VERSION = 2  # 2: content hashes (see module docstring)
COMMAND = "mmdd prepare"


def shortcut_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"shortcut_{index:03d}.safetensors"


def default_shortcut_dir(experts_dir: str | Path, start: int, end: int) -> Path:
    """Conventional location of the shortcut files of ``experts_dir`` for the segment ``start..end``."""
    return Path(experts_dir) / f"shortcut_s{start}_e{end}"


def layer_numels_from_meta(meta: dict[str, Any], tower: str) -> list[int]:
    """Per-parameter-tensor sizes of ``tower`` from expert metadata.

    Accepted layouts: ``layer_numels[tower]``; ``param_shapes[tower]`` or ``shapes[tower]``;
    ``towers[tower].shapes``. Raises ValueError naming the fix otherwise."""
    if isinstance(meta.get("layer_numels"), dict) and tower in meta["layer_numels"]:
        return [int(n) for n in meta["layer_numels"][tower]]
    shapes = None
    for key in ("param_shapes", "shapes"):
        if isinstance(meta.get(key), dict) and tower in meta[key]:
            shapes = meta[key][tower]
            break
    if shapes is None and isinstance(meta.get("towers"), dict) and isinstance(meta["towers"].get(tower), dict):
        shapes = meta["towers"][tower].get("shapes")
    if shapes is None:
        raise ValueError(f"expert metadata has no parameter shapes for tower {tower!r} (keys: {sorted(meta)}); "
                         "rerun `mmdd experts` with a version that records them, or pass layer_numels explicitly")
    return [int(math.prod(s)) for s in shapes]


def compute_beta(read: Any, start: int, end: int, numels: list[int]) -> torch.Tensor:
    """β table ``[layers, K+1]`` (float64) from ``read(epoch) -> flat vector`` over epochs ``start..end``."""
    k = end - start
    steps = torch.zeros(len(numels), k, dtype=torch.float64)
    prev = read(start).double()
    if prev.numel() != sum(numels):
        raise ValueError(f"flat vector has {prev.numel()} entries but the layers sum to {sum(numels)}")
    for p in range(k):
        cur = read(start + p + 1).double()
        diff = cur - prev
        steps[:, p] = torch.stack([c.norm() for c in torch.split(diff, numels)])
        prev = cur
    cum = torch.zeros(len(numels), k + 1, dtype=torch.float64)
    cum[:, 1:] = torch.cumsum(steps, dim=1)
    total = cum[:, -1:].clone()
    beta = torch.where(total > 0, cum / total.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(cum))
    beta = beta.clamp_(0.0, 1.0)
    beta[:, 0] = 0.0
    beta[:, -1] = torch.where(total[:, 0] > 0, 1.0, 0.0)  # exact 1 at the end (0 for a layer that never moved)
    return torch.cummax(beta, dim=1).values  # guard monotonicity against rounding


@dataclass
class ShortcutTrajectory:
    """θ̃(t) for t in ``start..end`` of one expert: endpoints + per-layer β.

    Backed either by a compact shortcut file (``path``) or by the raw expert (``expert``: endpoints read lazily from
    its memory-mapped file, β computed once in memory)."""

    index: int
    start: int
    end: int
    beta: dict[str, torch.Tensor]
    numels: dict[str, list[int]]
    meta: dict[str, Any]
    path: Path | None = None
    expert: ExpertTrajectory | None = None
    bytes_read: int = 0
    digests: dict[str, str] = field(default_factory=dict, repr=False)
    _weights: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict, repr=False)

    # -------------------------------------------------------------------- construction
    @classmethod
    def open(cls, path: str | Path) -> "ShortcutTrajectory":
        """Open ``path`` after checking its header against its sidecar; β is read (hash-checked) now, the endpoints
        when first requested."""
        path = Path(path)
        meta, digests = open_checked(path, "shortcut", COMMAND)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not an mmdd shortcut file: delete it and rerun `{COMMAND}`")
        beta = {t: read_checked(path, f"{t}.beta", digests, "cpu", "shortcut", COMMAND) for t in TOWERS}
        return cls(int(meta["index"]), int(meta["start"]), int(meta["end"]), beta,
                   {t: [int(n) for n in meta["layer_numels"][t]] for t in TOWERS}, meta, path=path, digests=digests)

    @classmethod
    def from_expert(cls, expert: ExpertTrajectory, start: int, end: int,
                    layer_numels: dict[str, list[int]] | None = None) -> "ShortcutTrajectory":
        """Compute β in memory; the endpoints stay in (and are read lazily from) the expert file."""
        _check_segment(expert, start, end)
        numels = {t: (layer_numels or {}).get(t) or layer_numels_from_meta(expert.meta, t) for t in TOWERS}
        beta = {t: compute_beta(lambda e, t=t: expert.read(t, e), start, end, numels[t]) for t in TOWERS}
        meta = _meta(expert, start, end, numels)
        return cls(expert.index, start, end, beta, numels, meta, expert=expert)

    # -------------------------------------------------------------------- reading
    @property
    def epochs(self) -> range:
        return range(self.start, self.end + 1)

    def endpoint(self, tower: str, which: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """θ(start) (``which='start'``) or θ(end) (``'end'``), exactly as in the expert."""
        if self.path is not None:
            t = read_checked(self.path, f"{tower}.{which}", self.digests, device, "shortcut", COMMAND)
            self.bytes_read += t.numel() * t.element_size()
            return t
        assert self.expert is not None
        return self.expert.read(tower, self.start if which == "start" else self.end, device)

    def weights(self, tower: str, epoch: int) -> torch.Tensor:
        """Per-layer β(epoch) expanded to one weight per parameter entry (float64)."""
        key = (tower, epoch)
        if key not in self._weights:
            b = self.beta[tower][:, epoch - self.start]
            self._weights.clear()  # keep one expanded vector at most
            self._weights[key] = torch.repeat_interleave(b, torch.tensor(self.numels[tower]))
        return self._weights[key]

    def read(self, tower: str, epoch: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """θ̃(epoch) of ``tower``: the endpoints themselves at ``start``/``end``, the per-layer lerp in between."""
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        if epoch not in self.epochs:
            raise IndexError(f"shortcut {self.index} covers epochs {self.start}..{self.end}, asked for {epoch}")
        if epoch == self.start:
            return self.endpoint(tower, "start", device)
        if epoch == self.end:
            return self.endpoint(tower, "end", device)
        a = self.endpoint(tower, "start", device)
        b = self.endpoint(tower, "end", device)
        w = self.weights(tower, epoch).to(device)
        return (a.double() + w * (b.double() - a.double())).to(a.dtype)


class ShortcutCollection:
    """All shortcut files of one directory, sorted by expert index."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        paths = indexed_files(self.directory, "shortcut", "shortcut trajectories", COMMAND)
        self.items = [ShortcutTrajectory.open(p) for p in paths]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> ShortcutTrajectory:
        return self.items[k]

    def __iter__(self):
        return iter(self.items)


# ------------------------------------------------------------------------------------------------------------------
def _check_segment(expert: ExpertTrajectory, start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"shortcut segment ({start}, {end}) is empty: need 0 <= start < end (end inclusive)")
    if end >= expert.num_timestamps:
        raise ValueError(f"shortcut end epoch {end} is beyond {expert.path.name}, which has epochs "
                         f"0..{expert.num_timestamps - 1}: lower 'end' or train longer experts")


def _meta(expert: ExpertTrajectory, start: int, end: int, numels: dict[str, list[int]]) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "index": expert.index, "start": start, "end": end,
            "source": expert.path.name, "source_config_hash": expert.meta.get("config_hash"),
            "source_sha256": recorded_sha256(expert.path),
            "layer_numels": numels, "param_names": expert.meta.get("param_names")}


def build_shortcut(expert: ExpertTrajectory, out_path: str | Path, start: int, end: int,
                   layer_numels: dict[str, list[int]] | None = None) -> Path:
    """Write one expert's shortcut file atomically (tensors + header metadata, then the JSON sidecar with hashes)."""
    traj = ShortcutTrajectory.from_expert(expert, start, end, layer_numels)
    tensors: dict[str, torch.Tensor] = {}
    for t in TOWERS:
        tensors[f"{t}.start"] = expert.read(t, start)
        tensors[f"{t}.end"] = expert.read(t, end)
        tensors[f"{t}.beta"] = traj.beta[t]
    out_path = Path(out_path)
    write_checked(out_path, tensors, traj.meta)
    return out_path


def build_shortcuts(experts_dir: str | Path, out_dir: str | Path | None, start: int, end: int,
                    layer_numels: dict[str, list[int]] | None = None, force: bool = False) -> list[Path]:
    """Build the shortcut file of every expert in ``experts_dir`` for epochs ``start..end`` (inclusive).

    ``out_dir`` None means :func:`default_shortcut_dir`. Idempotent: a file that is intact (content hash) and whose
    metadata matches (segment, source file, its content hash and config hash) is kept unless ``force``; a corrupt or
    half-written one is rebuilt. Returns the paths, in expert order."""
    experts = ExpertCollection(experts_dir)
    out = Path(out_dir) if out_dir is not None else default_shortcut_dir(experts_dir, start, end)
    paths = []
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    for expert in tqdm(list(experts), desc=f"shortcut {start}..{end}", unit="expert", disable=None):
        _check_segment(expert, start, end)
        path = shortcut_path(out, expert.index)
        if not force and _up_to_date(path, expert, start, end):
            paths.append(path)
            continue
        paths.append(build_shortcut(expert, path, start, end, layer_numels))
    log.info("wrote %d shortcut trajectories (epochs %d..%d) to %s", len(paths), start, end, out)
    return paths


def _up_to_date(path: Path, expert: ExpertTrajectory, start: int, end: int) -> bool:
    """Whether shortcut file ``path`` is intact and was built from exactly ``expert`` for ``start..end``."""
    if not path.exists():
        return False
    problem = content_problem(path)
    if problem is not None:
        log.warning("shortcut file %s %s; rebuilding it", path, problem)
        return False
    old = ShortcutTrajectory.open(path)
    return (old.start, old.end) == (start, end) and old.meta.get("source") == expert.path.name \
        and old.meta.get("source_config_hash") == expert.meta.get("config_hash") \
        and old.meta.get("source_sha256") == recorded_sha256(expert.path)


def shortcut_bytes_report(experts_dir: str | Path, shortcut_dir: str | Path) -> dict[str, Any]:
    """Bytes on disk of the shortcut files versus the raw trajectories they replace.

    ``raw_bytes``: the whole expert files; ``raw_segment_bytes``: what storing every epoch of the segment as a full
    copy (PTM's convexified buffers) would take (float32, both towers); ``shortcut_bytes``: the shortcut files
    (``.safetensors`` + ``.json``)."""
    experts = ExpertCollection(experts_dir)
    shortcuts = ShortcutCollection(shortcut_dir)
    by_index = {e.index: e for e in experts}
    raw = seg = short = 0
    for s in shortcuts:
        e = by_index.get(s.index)
        if e is None:
            raise ValueError(f"shortcut {s.index} in {shortcut_dir} has no expert in {experts_dir}")
        raw += e.path.stat().st_size + (e.path.with_suffix(".json").stat().st_size
                                        if e.path.with_suffix(".json").exists() else 0)
        seg += 4 * (s.end - s.start + 1) * sum(sum(s.numels[t]) for t in TOWERS)
        assert s.path is not None
        short += s.path.stat().st_size + (s.path.with_suffix(".json").stat().st_size
                                          if s.path.with_suffix(".json").exists() else 0)
    first = shortcuts[0]
    return {"experts": len(shortcuts), "start": first.start, "end": first.end, "raw_bytes": raw,
            "raw_segment_bytes": seg, "shortcut_bytes": short,
            "ratio_vs_segment": short / seg if seg else None, "ratio_vs_raw": short / raw if raw else None}
