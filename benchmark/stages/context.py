"""What every stage reads: the configuration, the on-disk layout, and the data, loaded once per process.

Stages refuse inputs produced under another configuration: the raw dataset's manifest, the caption features'
metadata and the experts' config hash are compared with params.yaml, and a mismatch names the stage to rerun.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from functools import cached_property
from pathlib import Path

import torch

from benchmark.config import BenchConfig
from benchmark.constants import SPLITS
from benchmark.evaluation import SplitData
from benchmark.interface import TrainData
from benchmark.models.student import StudentConfig
from benchmark.models.towers import load_tower_config
from benchmark.paths import Layout
from benchmark.stages.cells import Cell, hash_json

log = logging.getLogger(__name__)
EXPERTS_CODE = ("benchmark.stages.experts",)  # the code whose digest is part of the experts' identity


class StageContext:
    """One configuration on one machine. Loaded splits are cached per instance (never globally)."""

    def __init__(self, cfg: BenchConfig, layout: Layout, device: str | torch.device = "cpu", progress: bool = True):
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # a fixed count: reductions split the same way on every machine
        self.cfg = cfg
        self.layout = layout
        self.device = torch.device(device)
        self.progress = progress
        self._train: dict[str, TrainData] = {}
        self._splits: dict[tuple[str, str], SplitData] = {}

    # ------------------------------------------------------------------ configuration views
    @cached_property
    def student(self) -> StudentConfig:
        s = self.cfg.student
        return StudentConfig(tower=s.tower, text_dim=s.text_dim, temperature=s.temperature,
                             head_dropout=s.head_dropout, pretrained=s.pretrained,
                             tower_config=s.tower_config or load_tower_config(s.tower))

    @property
    def image_size(self) -> int:
        return int(self.student.tower_config["image_size"])

    def cells(self, datasets=None, methods=None, budgets=None, seeds=None) -> list[Cell]:
        """The grid's cells, optionally restricted."""
        g = self.cfg.grid
        return [Cell(ds, m, b, s) for ds in (datasets or self.cfg.datasets) for m in (methods or g.methods)
                for b in (budgets or g.budgets) for s in (g.seeds if seeds is None else seeds)]

    def cell_dir(self, cell: Cell) -> Path:
        return self.layout.cell(self.cfg.preset, cell.dataset, cell.method, cell.budget, cell.seed)

    def features_path(self, ds: str, split: str) -> Path:
        return self.layout.features(ds, self.cfg.text_encoder, split)

    def experts_dir(self, ds: str) -> Path:
        return self.layout.experts(ds, self.cfg.student.tower, self.cfg.text_encoder)

    def prepared_dir(self, ds: str, method: str) -> Path:
        return self.layout.prepared(ds, method)

    # ------------------------------------------------------------------ provenance checks
    def check_raw(self, ds: str) -> None:
        """The raw dataset on disk was produced by this configuration (generated data: same generator settings)."""
        manifest = self.layout.dataset_dir(ds) / "manifest.json"
        if ds != "shapes" or not manifest.exists():
            return
        on_disk = json.loads(manifest.read_text())
        want = asdict(self.cfg.data.shapes)
        diff = {k: (on_disk.get(k), v) for k, v in want.items() if on_disk.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: {a} on disk vs {b} in params.yaml" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{self.layout.dataset_dir(ds)} was generated under another configuration ({detail}): "
                             "rerun `mmdd fetch` (or `dvc repro`) for this params.yaml")

    def data_id(self, ds: str) -> str:
        """Identity of the training data as students see it: captions, encoder, image size, normalisation."""
        from benchmark.encoders.text import read_feature_metadata

        self.check_raw(ds)
        path = self.features_path(ds, "train")
        if not path.exists():
            raise FileNotFoundError(f"caption features {path} are missing: run `mmdd embed` first")
        meta = read_feature_metadata(path)
        if meta.get("encoder") not in (None, self.cfg.text_encoder):
            raise ValueError(f"{path} holds {meta.get('encoder')!r} features but params.yaml's text_encoder is "
                             f"{self.cfg.text_encoder!r}: rerun `mmdd embed`")
        d = self.cfg.data
        return hash_json([ds, meta.get("captions_sha256"), self.cfg.text_encoder, self.image_size, d.norm,
                          d.train_augment])

    def expert_config_hash(self, ds: str) -> str:
        from benchmark.experts.train import config_hash
        from benchmark.stages.code_deps import code_digest

        return config_hash(self.student, self.cfg.experts, self.data_id(ds), code_digest(EXPERTS_CODE))

    def experts(self, ds: str):
        """The dataset's expert collection, refused if trained under another configuration."""
        from benchmark.experts.store import ExpertCollection

        experts = ExpertCollection(self.experts_dir(ds))
        if experts.meta.get("config_hash") != self.expert_config_hash(ds):
            raise ValueError(f"experts in {self.experts_dir(ds)} were trained under another configuration: rerun "
                             "`mmdd experts`")
        return experts

    # ------------------------------------------------------------------ data
    def caption_split(self, ds: str, split: str):
        from benchmark.data.karpathy import load_split

        return load_split(self.layout.raw_root, ds, split, self.cfg.data.max_words)

    def features(self, ds: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from benchmark.encoders.text import load_features

        feats, txt2img, _ = load_features(self.features_path(ds, split))
        return feats, txt2img

    def images(self, ds: str, split, kind: str = "test"):
        from benchmark.data.images import ImageFolder, load_images
        from benchmark.data.transforms import build_transform

        d = self.cfg.data
        augment = d.train_augment if kind == "train" else "none"
        transform = build_transform(kind, self.image_size, d.norm, augment)
        if ds == "shapes" and kind == "test":  # small: decode once, keep in memory
            return load_images(split.root, split.image_paths, transform, progress=self.progress)
        return ImageFolder(split.root, split.image_paths, transform)

    def train_data(self, ds: str) -> TrainData:
        """The training pairs (images in the init/test transform; caption features)."""
        if ds not in self._train:
            self.check_raw(ds)
            split = self.caption_split(ds, "train")
            feats, txt2img = self.features(ds, "train")
            if len(feats) != split.n_captions or not torch.equal(txt2img, split.txt2img):
                raise ValueError(f"train caption features of {ds} do not match the annotations: rerun `mmdd embed`")
            self._train[ds] = TrainData(self.images(ds, split, self.cfg.data.init_transform), feats,
                                        split.txt2img, split.captions)
        return self._train[ds]

    def eval_split(self, ds: str, split_name: str) -> SplitData:
        if split_name not in SPLITS:
            raise ValueError(f"unknown split {split_name!r}: choose from {SPLITS}")
        key = (ds, split_name)
        if key not in self._splits:
            split = self.caption_split(ds, split_name)
            feats, txt2img = self.features(ds, split_name)
            self._splits[key] = SplitData(self.images(ds, split), feats, txt2img)
        return self._splits[key]


def make_context(params: str | Path = "params.yaml", overrides: list[str] | None = None,
                 datasets: list[str] | None = None, device: str = "cpu", data_root: str | None = None,
                 results_root: str = "results", progress: bool = True) -> StageContext:
    """A context from a params file (plus dotted overrides), as the CLI builds it."""
    from benchmark.config import load_config

    cfg = load_config(params, overrides)
    if datasets:
        unknown = sorted(set(datasets) - set(cfg.datasets))
        if unknown:
            raise ValueError(f"dataset(s) {unknown} are not in params.yaml's datasets {cfg.datasets}")
        cfg.datasets = list(datasets)
    layout = Layout(Path(data_root or cfg.data.root).resolve(), Path(results_root).resolve())
    return StageContext(cfg, layout, device, progress)
