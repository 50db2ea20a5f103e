"""Where the real datasets come from: annotation files, image archives, pinned checksums and expected sizes.

Pure data; :mod:`benchmark.data.fetch` does the work. Checksums are pinned only where they were verified
(docs/protocols.md#karpathy-splits); files without a pinned hash are recorded in ``<data_root>/<ds>/fetch.lock.json`` after their
first complete, consistent download and checked against it (size, then sha256) afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BLIP_BASE_URL = "https://storage.googleapis.com/sfr-vision-language-research/datasets"
COCO_IMAGES_BASE_URL = "http://images.cocodataset.org/zips"

#: Environment variable holding a URL or local path of a Flickr30k image archive (used when no override is given).
FLICKR30K_IMAGES_ENV = "MMDD_FLICKR30K_IMAGES"


@dataclass(frozen=True)
class FileSource:
    """One annotation file: its name (under ``annotations/``), URL and, where known, sha256 and size."""

    filename: str
    url: str
    sha256: str | None = None
    bytes: int | None = None


@dataclass(frozen=True)
class ArchiveSource:
    """An image archive that, once extracted, provides the directory ``target`` under the dataset directory.

    ``url`` is ``None`` when the archive cannot be downloaded without accepting terms; ``manual`` says how to get it.
    """

    key: str
    target: str
    url: str | None
    manual: str
    sha256: str | None = None
    bytes: int | None = None
    env: str | None = None  # environment variable that may hold a URL or local path of the archive


@dataclass(frozen=True)
class SplitSize:
    images: int
    captions: int


@dataclass(frozen=True)
class DatasetSource:
    name: str
    annotations: dict[str, FileSource]      # split -> file
    archives: tuple[ArchiveSource, ...]
    expected_sizes: dict[str, SplitSize] = field(default_factory=dict)


def _ann(filename: str, sha256: str | None = None, size: int | None = None) -> FileSource:
    return FileSource(filename, f"{BLIP_BASE_URL}/{filename}", sha256, size)


FLICKR30K_MANUAL = (
    "The Flickr30k images are distributed only after accepting their terms of use: request them through the "
    "University of Illinois Flickr30k form (linked from https://shannon.cs.illinois.edu/DenotationGraph/ and the "
    "Flickr30k Entities page https://bryanplummer.com/Flickr30kEntities/), or download the Kaggle dataset "
    "'hsankesara/flickr-image-dataset'. Then pass the archive (zip or tar.gz, local path or URL) as "
    f"image_archives={{'flickr30k-images': ...}} / `--images`, or set ${FLICKR30K_IMAGES_ENV}; "
    "or extract it yourself so that <data_root>/flickr30k/flickr30k-images/<id>.jpg exists."
)

SOURCES: dict[str, DatasetSource] = {
    "flickr30k": DatasetSource(
        name="flickr30k",
        annotations={
            "train": _ann("flickr30k_train.json"),
            "val": _ann("flickr30k_val.json",
                        "eed9daa3c88f980fda8a1481b9ebec811e7f8d9d862a79e259e97c2b2a0481c2", 404171),
            "test": _ann("flickr30k_test.json",
                         "5d2a8e7365ff2220cf885e3fb656dd33b72b3a8f8c761067deebb0b22718806d", 396858),
        },
        archives=(ArchiveSource("flickr30k-images", "flickr30k-images", None, FLICKR30K_MANUAL,
                                env=FLICKR30K_IMAGES_ENV),),
        expected_sizes={
            "train": SplitSize(29000, 145000),   # BLIP release, not verified (docs/protocols.md#karpathy-splits)
            "val": SplitSize(1014, 5070),
            "test": SplitSize(1000, 5000),
        },
    ),
    "coco": DatasetSource(
        name="coco",
        annotations={
            "train": _ann("coco_karpathy_train.json"),
            "val": _ann("coco_karpathy_val.json",
                        "51f6dcf544cc0d3bd7086b1cd5aa3dcc9a26fcc718e623099027a902da06a848", 1735981),
            "test": _ann("coco_karpathy_test.json",
                         "5b202a235ee2a4e13f82b984ef9293b8e2d34f9b1f92147bf8340580f20faf15", 1735468),
        },
        archives=tuple(
            ArchiveSource(f"{part}.zip", part, f"{COCO_IMAGES_BASE_URL}/{part}.zip",
                          f"Download {COCO_IMAGES_BASE_URL}/{part}.zip (cocodataset.org) and pass its path as "
                          f"image_archives={{'{part}.zip': <path>}}, or extract it so that "
                          f"<data_root>/coco/{part}/COCO_{part}_<id>.jpg exists.")
            for part in ("train2014", "val2014")
        ),
        expected_sizes={
            "train": SplitSize(113287, 566747),  # BLIP release, not verified (docs/protocols.md#karpathy-splits)
            "val": SplitSize(5000, 25010),
            "test": SplitSize(5000, 25010),
        },
    ),
}


def get_source(name: str) -> DatasetSource:
    """The :class:`DatasetSource` of a downloadable dataset; ``ValueError`` lists the valid names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ValueError(f"no download source for dataset {name!r}; downloadable: {', '.join(sorted(SOURCES))} "
                         "(the 'shapes' dataset is generated locally)") from None
