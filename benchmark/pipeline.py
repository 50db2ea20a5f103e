"""The benchmark stages (DESIGN §2) as functions of a :class:`BenchConfig`; each CLI command and DVC stage calls one.

Every stage is idempotent: outputs carry a hash of what produced them and are skipped when up to date; writes are
atomic, so an interrupted stage leaves either the old complete output or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from benchmark import __version__
from benchmark.config import BenchConfig
from benchmark.distilled import DistilledSet
from benchmark.evaluation import SplitData, evaluate_full_data, evaluate_set
from benchmark.experts.store import ExpertCollection
from benchmark.experts.train import config_hash as expert_config_hash
from benchmark.experts.train import train_experts
from benchmark.interface import Checkpointer, DistillTask, JsonlLogger, TrainData
from benchmark.io import read_json, write_json
from benchmark.models.student import StudentConfig
from benchmark.models.towers import load_tower_config
from benchmark.paths import Layout
from benchmark.registry import get_method

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Bench:
    """Stages over one configuration. Loaded splits are cached per instance (not globally)."""

    def __init__(self, cfg: BenchConfig, layout: Layout, device: str | torch.device = "cpu", progress: bool = True):
        self.cfg = cfg
        self.layout = layout
        self.device = torch.device(device)
        self.progress = progress
        self._train: dict[str, TrainData] = {}
        self._splits: dict[tuple[str, str], SplitData] = {}

    # ---------------------------------------------------------------- configuration helpers
    def check_dataset(self, ds: str) -> None:
        from benchmark.data.datasets import get_dataset_info

        get_dataset_info(ds)

    @cached_property
    def student(self) -> StudentConfig:
        s = self.cfg.student
        return StudentConfig(tower=s.tower, text_dim=s.text_dim, temperature=s.temperature,
                             head_dropout=s.head_dropout, pretrained=s.pretrained,
                             tower_config=s.tower_config or load_tower_config(s.tower))

    @property
    def image_size(self) -> int:
        return int(self.student.tower_config["image_size"])

    def data_id(self, ds: str) -> str:
        """Identity of the training data as seen by students: captions, encoder, image size, normalisation."""
        from benchmark.encoders.text import read_feature_metadata

        path = self.features_path(ds, "train")
        if not path.exists():
            raise FileNotFoundError(f"caption features {path} are missing: run `mmdd embed` first")
        meta = read_feature_metadata(path)
        d = self.cfg.data
        return _hash([ds, meta.get("captions_sha256"), self.cfg.text_encoder, self.image_size, d.norm,
                      d.train_augment])

    def features_path(self, ds: str, split: str) -> Path:
        return self.layout.features(ds, self.cfg.text_encoder, split)

    # ---------------------------------------------------------------- stage: fetch
    def fetch(self, ds: str) -> Path:
        """Generate (``shapes``) or download and verify a dataset into ``data/raw/<ds>``."""
        self.check_dataset(ds)
        out = self.layout.dataset_dir(ds)
        if ds == "shapes":
            from benchmark.data.shapes import generate_shapes

            return generate_shapes(out, **asdict(self.cfg.data.shapes))
        from benchmark.data.fetch import fetch_dataset

        return fetch_dataset(ds, self.layout.raw_root, progress=self.progress, **self.cfg.data.sources.get(ds, {}))

    # ---------------------------------------------------------------- stage: embed
    def load_caption_split(self, ds: str, split: str):
        from benchmark.data.karpathy import load_split

        return load_split(self.layout.raw_root, ds, split, self.cfg.data.max_words)

    def embed(self, ds: str) -> list[Path]:
        """Caption features of every split with the frozen text encoder."""
        from benchmark.encoders.text import embed_split

        return [embed_split(self.load_caption_split(ds, s), self.features_path(ds, s), self.cfg.text_encoder,
                            str(self.device)) for s in SPLITS]

    def _features(self, ds: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from benchmark.encoders.text import load_features

        feats, txt2img, _ = load_features(self.features_path(ds, split))
        return feats, txt2img

    def _images(self, ds: str, split, kind: str = "test"):
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
            split = self.load_caption_split(ds, "train")
            feats, txt2img = self._features(ds, "train")
            if len(feats) != split.n_captions or not torch.equal(txt2img, split.txt2img):
                raise ValueError(f"train caption features of {ds} do not match the annotations: rerun `mmdd embed`")
            self._train[ds] = TrainData(self._images(ds, split, self.cfg.data.init_transform), feats,
                                        split.txt2img, split.captions)
        return self._train[ds]

    def eval_split(self, ds: str, split_name: str) -> SplitData:
        key = (ds, split_name)
        if key not in self._splits:
            split = self.load_caption_split(ds, split_name)
            feats, txt2img = self._features(ds, split_name)
            self._splits[key] = SplitData(self._images(ds, split), feats, txt2img)
        return self._splits[key]

    # ---------------------------------------------------------------- stage: experts
    def experts_dir(self, ds: str) -> Path:
        return self.layout.experts(ds, self.cfg.student.tower, self.cfg.text_encoder)

    def experts(self, ds: str, indices: list[int] | None = None) -> list[Path]:
        """Train (or keep) the expert trajectories of ``ds``."""
        train = self.train_data(ds)
        if self.cfg.data.train_augment != "none":
            split = self.load_caption_split(ds, "train")
            train = TrainData(self._images(ds, split, "train"), train.texts, train.caption_image, train.captions)
        return train_experts(self.experts_dir(ds), train, self.student, self.cfg.experts, self.data_id(ds),
                             self.device, indices, self.progress)

    # ---------------------------------------------------------------- stage: distill
    def cell_dir(self, ds: str, method: str, budget: int, seed: int) -> Path:
        return self.layout.cell(self.cfg.preset, ds, method, budget, seed)

    def cell_key(self, ds: str, method: str, budget: int, seed: int) -> tuple[type, dict[str, Any], str]:
        """(method class, resolved params, hash of everything the cell's output depends on)."""
        cls = get_method(method)
        params = cls.resolve_params(self.cfg.preset, ds, budget, self.cfg.method_overrides(method))
        experts = self.expert_hash(ds) if cls.needs_experts else None
        key = _hash({"method": method, "params": params, "budget": budget, "seed": seed, "data": self.data_id(ds),
                     "student": asdict(self.student), "experts": experts})
        return cls, params, key

    def expert_hash(self, ds: str) -> str:
        return expert_config_hash(self.student, self.cfg.experts, self.data_id(ds))

    def make_task(self, ds: str, method: str, budget: int, seed: int, work_dir: Path) -> tuple[Any, DistillTask]:
        """The method instance and its task; logs and checkpoints go to ``work_dir``."""
        self.check_dataset(ds)
        cls, params, _ = self.cell_key(ds, method, budget, seed)
        train = self.train_data(ds)
        if budget > train.n_pairs:
            raise ValueError(f"budget {budget} exceeds the {train.n_pairs} training pairs of {ds}: lower grid.budgets")
        experts = None
        if cls.needs_experts:
            experts = ExpertCollection(self.experts_dir(ds))
            if experts.meta.get("config_hash") != self.expert_hash(ds):
                raise ValueError(f"experts in {self.experts_dir(ds)} were trained with another configuration: "
                                 "rerun `mmdd experts`")
        task = DistillTask(train=train, student=self.student, budget=budget, seed=seed, params=params,
                           device=self.device, experts=experts, logger=JsonlLogger(work_dir / "distill_log.jsonl"),
                           checkpoint=Checkpointer(work_dir / "checkpoint", int(params.get("checkpoint_every", 0) or 0)),
                           dataset=ds, preset=self.cfg.preset)
        return cls(), task

    def run_method(self, ds: str, method: str, budget: int, seed: int, work_dir: Path) -> DistilledSet:
        """Run the method in this process and save its raw DistilledSet to ``work_dir/distilled`` (no evaluation).

        This is what a container runner executes inside the container.
        """
        impl, task = self.make_task(ds, method, budget, seed, work_dir)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        dset = impl.distill(task)
        dset.meta["seconds"] = time.perf_counter() - t0
        dset.save(work_dir / "distilled")
        task.checkpoint.clear()
        return dset

    def distill(self, ds: str, method: str, budget: int, seed: int, force: bool = False,
                runner: str = "local") -> Path:
        """Run one grid cell's distillation (``runner``: local or docker); the harness then validates the set and
        records it in the cell directory (``distilled.{safetensors,json}``, ``distill_info.json``)."""
        self.check_dataset(ds)
        _, params, key = self.cell_key(ds, method, budget, seed)
        cell = self.cell_dir(ds, method, budget, seed)
        info_path = cell / "distill_info.json"
        if not force and info_path.exists() and read_json(info_path).get("key") == key \
                and (cell / "distilled.json").exists():
            log.info("cell %s is up to date", cell)
            return cell
        (cell / "distill_log.jsonl").unlink(missing_ok=True)
        if runner == "local":
            dset = self.run_method(ds, method, budget, seed, cell)
        else:
            from benchmark.runners import get_runner

            dset = get_runner(runner)(self, ds, method, budget, seed, cell)
        dset.validate(budget=budget, image_shape=(3, self.image_size, self.image_size),
                      text_dim=self.student.text_dim)
        dset.meta.update({"method": method, "params": params, "budget": budget, "seed": seed, "dataset": ds,
                          "encoder": self.cfg.text_encoder, "tower": self.cfg.student.tower,
                          "temperature": self.student.temperature, "preset": self.cfg.preset, "runner": runner,
                          "versions": {"mmdd": __version__, "torch": torch.__version__}})
        dset.save(cell / "distilled")
        write_json(info_path, {"key": key, "seconds": dset.meta.get("seconds"), "pairs": dset.pairs,
                               "bytes": dset.nbytes, "method": method, "budget": budget, "seed": seed, "dataset": ds,
                               "runner": runner})
        log.info("%s b=%d s=%d: %d pairs, %d bytes, %.1f s", method, budget, seed, dset.pairs, dset.nbytes,
                 dset.meta.get("seconds") or 0.0)
        return cell

    # ---------------------------------------------------------------- stage: evaluate
    def evaluate(self, ds: str, method: str, budget: int, seed: int, force: bool = False) -> dict[str, Any]:
        """Evaluate one cell's DistilledSet with fresh students; writes ``metrics.json`` in the cell."""
        cell = self.cell_dir(ds, method, budget, seed)
        dset = DistilledSet.load(cell / "distilled")
        dset.validate(budget=budget, image_shape=(3, self.image_size, self.image_size),
                      text_dim=self.student.text_dim)
        ecfg = self.cfg.eval
        key = _hash({"set": read_json(cell / "distilled.json"), "eval": asdict(ecfg), "student": asdict(self.student)})
        out_path = cell / "metrics.json"
        if not force and out_path.exists() and read_json(out_path).get("key") == key:
            return read_json(out_path)
        val = self.eval_split(ds, "val") if ecfg.select == "val" else None
        t0 = time.perf_counter()
        res = evaluate_set(dset, self.student, ecfg, self.eval_split(ds, "test"), val, self.device, self.progress)
        res.update({"key": key, "seconds": time.perf_counter() - t0, "pairs": dset.pairs, "bytes": dset.nbytes,
                    "method": method, "budget": budget, "seed": seed, "dataset": ds})
        write_json(out_path, res)
        return res

    def full_data(self, ds: str, force: bool = False) -> dict[str, Any]:
        """Reference row: students trained on the whole training split."""
        out_path = self.layout.full_data(self.cfg.preset, ds) / "metrics.json"
        fd = self.cfg.full_data
        key = _hash({"data": self.data_id(ds), "eval": asdict(self.cfg.eval), "full": asdict(fd),
                     "student": asdict(self.student)})
        if not force and out_path.exists() and read_json(out_path).get("key") == key:
            return read_json(out_path)
        t0 = time.perf_counter()
        res = evaluate_full_data(self.train_data(ds), self.student, self.cfg.eval, self.eval_split(ds, "test"),
                                 fd.lr, fd.epochs, self.device, self.progress)
        res.update({"key": key, "seconds": time.perf_counter() - t0, "method": "full-data",
                    "pairs": self.train_data(ds).n_pairs, "dataset": ds})
        write_json(out_path, res)
        return res

    # ---------------------------------------------------------------- grid
    def cells(self) -> list[tuple[str, str, int, int]]:
        g = self.cfg.grid
        return [(ds, m, b, s) for ds in self.cfg.datasets for m in g.methods for b in g.budgets for s in g.seeds]
