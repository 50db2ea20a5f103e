"""The train-only inputs a method may read, as read-only mounts under ``/data`` (the host layout of
:mod:`benchmark.paths`, restricted):

- ``raw/<ds>/annotations/<train file>`` (never the val or test annotation files, nor the manifest);
- the train images: every directory holding train images; a directory that also holds other files (Flickr30k's
  single ``flickr30k-images/``, COCO's ``val2014/`` with the Karpathy "restval" images) is replaced by a *view*: a
  directory of hard links (copies across file systems) to its train images only, built once under
  ``<data_root>/views/<ds>/`` and reused while the images are unchanged (``views/`` may be deleted whenever no
  method runs);
- ``features/<ds>/<encoder>/train.safetensors``;
- ``experts/<ds>/<tower>-<encoder>/`` and ``shortcuts/<ds>/<tower>-<encoder>/`` when they exist (trained on train).

The val and test splits are given to no method: model selection inside a method uses train data only.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from benchmark.data.datasets import annotation_path
from benchmark.paths import Layout

log = logging.getLogger(__name__)
CONTAINER_DATA = PurePosixPath("/data")
VIEWS_DIR = "views"


def container_path(layout: Layout, host: Path) -> str:
    """Where a host path under the data root appears in the container."""
    return str(CONTAINER_DATA / Path(host).relative_to(layout.data_root).as_posix())


def train_mounts(layout: Layout, ds: str, encoder: str, tower: str,
                 method: str | None = None) -> tuple[tuple[Path, str], ...]:
    """``(host path, container path)`` of every train-only input of ``ds`` (see the module doc) — with the expert
    trajectories and ``method``'s prepared artifacts when they exist — parents first."""
    ann = annotation_path(layout.raw_root, ds, "train")
    features = layout.features(ds, encoder, "train")
    for path, hint in ((ann, "mmdd fetch"), (features, "mmdd embed")):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `{hint}` first (the method's container needs it)")
    mounts = [(ann, container_path(layout, ann)), (features, container_path(layout, features))]
    ds_dir = layout.dataset_dir(ds)
    for host_dir, rel in image_dirs(ds_dir, train_image_paths(ann), layout.data_root / VIEWS_DIR / ds):
        mounts.append((host_dir, container_path(layout, ds_dir / rel)))
    extras = [layout.experts(ds, tower, encoder)] + ([layout.prepared(ds, method)] if method else [])
    for extra in extras:
        if extra.is_dir():
            mounts.append((extra, container_path(layout, extra)))
    return tuple(sorted(mounts, key=lambda m: (m[1].count("/"), m[1])))


def train_image_paths(ann: Path) -> list[str]:
    """The image paths (relative to the dataset directory) named by a train annotation file."""
    import json

    entries = json.loads(ann.read_text(encoding="utf-8"))
    paths = sorted({e["image"] for e in entries if isinstance(e, dict) and isinstance(e.get("image"), str)})
    for p in paths:
        pp = PurePosixPath(p)
        if pp.is_absolute() or ".." in pp.parts or not pp.parts:
            raise ValueError(f"{ann}: image path {p!r} leaves the dataset directory; re-fetch the dataset")
    return paths


def image_dirs(ds_dir: Path, images: list[str], views: Path) -> list[tuple[Path, str]]:
    """``(host dir, dir relative to ds_dir)`` to mount so exactly ``images`` are visible: a directory holding
    nothing but train images is mounted as is, any other one through a view."""
    by_dir: dict[str, set[str]] = {}
    for p in images:
        pp = PurePosixPath(p)
        by_dir.setdefault(str(pp.parent), set()).add(pp.name)
    out = []
    for rel, names in sorted(by_dir.items()):
        src = ds_dir / rel
        present = set(os.listdir(src)) if src.is_dir() else set()
        if rel != "." and present == names:  # nothing else in it (so no sub-directory either)
            out.append((src, rel))
        else:
            kids = {PurePosixPath(d).relative_to(rel).parts[0] for d in by_dir
                    if d != rel and PurePosixPath(d).is_relative_to(rel)}
            out.append((build_view(src, sorted(names), sorted(kids), views), rel))
    return out


def build_view(src: Path, names: list[str], subdirs: list[str], views: Path) -> Path:
    """A directory holding only ``names`` of ``src`` (hard links, copies across file systems) and empty
    ``subdirs`` (mount points of nested image directories). Built beside and renamed into place; reused while the
    images are unchanged."""
    missing = [n for n in names if not (src / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} train image(s) missing under {src} (e.g. {missing[0]}): "
                                "rerun `mmdd fetch`")
    h = hashlib.sha256("\0".join([str(src.resolve()), "/", *subdirs]).encode())
    for name in names:  # a re-fetched image (new inode or size or time) gets a new view
        st = (src / name).stat()
        h.update(f"\0{name}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    view = views / h.hexdigest()[:16]
    if view.is_dir():  # views appear only by renaming a complete one into place
        return view
    views.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".view-", dir=views))
    copied = 0
    try:
        for name in names:
            try:
                os.link(src / name, tmp / name)
            except OSError:  # another file system, or hard links refused (fs.protected_hardlinks)
                shutil.copy2(src / name, tmp / name)
                copied += 1
        for d in subdirs:
            (tmp / d).mkdir()
        tmp.chmod(0o755)
        os.rename(tmp, view)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not view.is_dir():  # not a concurrent builder winning the rename
            raise
    if copied:
        log.warning("train-image view %s: %d of %d images copied (not hard-linked): put views/ on the file "
                    "system of the images to save the space", view, copied, len(names))
    log.info("train-image view of %s: %d images in %s", src, len(names), view)
    return view
