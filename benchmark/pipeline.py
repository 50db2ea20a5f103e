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
from benchmark.io import atomic_path, read_json, write_json
from benchmark.models.student import StudentConfig
from benchmark.models.towers import load_tower_config
from benchmark.paths import Layout
from benchmark.registry import get_method

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def read_history(cell: Path) -> list[dict[str, float]]:
    """The per-iteration distillation log of a cell (empty for methods that log nothing)."""
    path = cell / "distill_log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
                            str(self.device), progress=self.progress) for s in SPLITS]

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

    # ---------------------------------------------------------------- stage: shortcut
    def shortcuts_dir(self, ds: str) -> Path:
        return self.layout.shortcuts(ds, self.cfg.student.tower, self.cfg.text_encoder)

    def shortcut(self, ds: str) -> list[dict[str, Any]]:
        """Build the shortcut teachers of every configured segment; returns a bytes report per segment."""
        from methods.matching.shortcut import build_shortcuts, default_shortcut_dir, shortcut_bytes_report

        reports = []
        for start, end in self.cfg.shortcut.segments:
            out = default_shortcut_dir(self.shortcuts_dir(ds), start, end)
            build_shortcuts(self.experts_dir(ds), out, start, end)
            rep = shortcut_bytes_report(self.experts_dir(ds), out)
            log.info("shortcut %d..%d: %s", start, end, rep)
            reports.append({"start": start, "end": end, **rep})
        self.shortcuts_dir(ds).mkdir(parents=True, exist_ok=True)  # DVC output exists even with no segments
        return reports

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
        log_path = work_dir / "distill_log.jsonl"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.touch()  # every cell has a (possibly empty) log: DVC declares it as an output
        task = DistillTask(train=train, student=self.student, budget=budget, seed=seed, params=params,
                           device=self.device, experts=experts, logger=JsonlLogger(log_path),
                           shortcuts=self.shortcuts_dir(ds),
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
            from benchmark.runners import CellSpec, SandboxLimits, get_runner
            from benchmark.runners.inputs import train_mounts
            from benchmark.runners.spec import config_document

            spec = CellSpec(dataset=ds, method=method, budget=budget, seed=seed, device=str(self.device),
                            data_root=self.layout.data_root, work_dir=cell,
                            config_doc=config_document(self.cfg, self.student.tower_config),
                            mounts=train_mounts(self.layout, ds, self.cfg.text_encoder, self.cfg.student.tower),
                            limits=SandboxLimits.from_env())
            dset = get_runner(runner)(spec)
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
        artifacts = self.cell_artifacts(ds, cell, dset)
        if self.cfg.tracking.enabled:
            res["mlflow_run_id"] = self.track_cell(ds, method, budget, seed, cell, key, res, artifacts)
        write_json(out_path, res)
        return res

    def cell_artifacts(self, ds: str, cell: Path, dset: DistilledSet) -> list[Path]:
        """Image grid, nearest training caption per distilled text, loss curve (``<cell>/artifacts/``)."""
        from benchmark.artifacts import save_image_grid, save_loss_curve, save_nearest_captions

        out = cell / "artifacts"
        images = torch.cat([p.images for p in dset.phases])
        texts = torch.cat([p.texts for p in dset.phases])
        train_texts, _ = self._features(ds, "train")  # captions and features only: no image decoding here
        captions = self.load_caption_split(ds, "train").captions
        paths = [save_image_grid(images, self.cfg.data.norm, out / "images.png"),
                 save_nearest_captions(texts, train_texts, captions, out / "nearest_captions.tsv")]
        curve = save_loss_curve(read_history(cell), out / "loss_curve.png", cell.relative_to(self.layout.results_root)
                                .as_posix())
        return paths + ([curve] if curve else [])

    def track_cell(self, ds: str, method: str, budget: int, seed: int, cell: Path, key: str, res: dict[str, Any],
                   artifacts: list[Path]) -> str:
        """Record the cell in MLflow (experiment ``<prefix>-<dataset>``, nested runs per student)."""
        from benchmark.tracking import Tracker

        tcfg = self.cfg.tracking
        tracker = Tracker(tcfg.uri or None, root=self.layout.results_root)
        info = read_json(cell / "distill_info.json") if (cell / "distill_info.json").exists() else {}
        history = read_history(cell)
        metrics: dict[str, float] = {"pairs": res["pairs"], "bytes": res["bytes"], "eval_seconds": res["seconds"]}
        for proto, summary in res["protocols"].items():
            prefix = "test" if proto == "strict" else f"test_{proto}"
            metrics |= {f"{prefix}.{k}": v["mean"] for k, v in summary.items() if isinstance(v, dict)}
            metrics |= {f"{prefix}.{k}_std": v["std"] for k, v in summary.items() if isinstance(v, dict)}
        if info.get("seconds") is not None:
            metrics["distill_seconds"] = info["seconds"]
        iter_secs = [r["sec_per_iter"] for r in history if "sec_per_iter" in r]
        if iter_secs:
            metrics["seconds_per_iter"] = sum(iter_secs) / len(iter_secs)
        peaks = [r["peak_mem_mb"] for r in history if "peak_mem_mb" in r]
        if peaks:
            metrics["peak_memory_mb"] = max(peaks)
        dset_meta = read_json(cell / "distilled.json")["meta"]
        params = {"method": method, "budget": budget, "seed": seed, "dataset": ds,
                  "method_params": dset_meta.get("params", {}), "eval": asdict(self.cfg.eval),
                  "student": {"tower": self.student.tower, "temperature": self.student.temperature},
                  "text_encoder": self.cfg.text_encoder}
        tags = {"mmdd.preset": self.cfg.preset, "mmdd.protocol": ",".join(self.cfg.eval.protocols), "mmdd.method": method,
                "mmdd.budget": budget, "mmdd.seed": seed, "mmdd.dataset": ds, "mmdd.stage": "evaluate"}
        per_student = [{f"{proto}.{k}": v for proto, summary in res["protocols"].items()
                        for k, v in summary["students"][i].items()} for i in range(self.cfg.eval.students)]
        return tracker.log_cell(f"{tcfg.experiment_prefix}-{ds}", f"{method}/b{budget}/s{seed}", key, params, tags,
                                metrics, history, per_student, artifacts)

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

    # ---------------------------------------------------------------- stage: report
    def report(self) -> dict[str, Any]:
        """Tables (md/csv/tex, published numbers beside ours), plots, ``results/metrics/<preset>.json`` and a
        generated ``results/README.md``. Returns the rendered markdown per dataset."""
        from benchmark import report as rp

        tables_dir = self.layout.tables(self.cfg.preset)
        plots_dir = self.layout.results_root / "plots" / self.cfg.preset
        rendered, summary, links = {}, {}, []
        for ds in self.cfg.datasets:
            cells = [c for c in self.cells() if c[0] == ds]
            rows = rp.collect_rows(rp.load_metrics([self.cell_dir(*c) / "metrics.json" for c in cells]))
            full = self.layout.full_data(self.cfg.preset, ds) / "metrics.json"
            if full.exists():
                rows += rp.collect_rows(rp.load_metrics([full]))
            rp.write_tables(rows, tables_dir, ds)
            md = rp.render_with_published(rows, ds)
            with atomic_path(tables_dir / f"{ds}.md") as tmp:
                tmp.write_text(md + "\n")
            rendered[ds] = md
            summary[ds] = rp.summary_metrics(rows)
            title = f"{ds}, {self.cfg.preset} preset, strict protocol"
            plots = [rp.plot_recall_vs_budget([r for r in rows if r.protocol == "strict"],
                                              plots_dir / f"{ds}_recall_vs_budget.png", title)]
            g = self.cfg.grid
            budget, seed = max(g.budgets), g.seeds[0]
            curves = {m: read_history(self.cell_dir(ds, m, budget, seed)) for m in g.methods}
            curve = rp.plot_distill_curves(curves, plots_dir / f"{ds}_distill_curves.png",
                                           f"{ds}, {budget} pairs, seed {seed}")
            plots += [curve] if curve else []
            grids = [(m, self.cell_dir(ds, m, budget, seed) / "artifacts" / "images.png") for m in g.methods]
            links.append((ds, md, plots, grids))
        write_json(self.layout.results_root / "metrics" / f"{self.cfg.preset}.json", summary)
        self._write_results_readme(links)
        return rendered

    def _write_results_readme(self, links) -> None:
        root = self.layout.results_root
        lines = [f"# Results: `{self.cfg.preset}` preset", "",
                 "Generated by the `report` stage (`mmdd report`); do not edit. Each value is the mean ± std over "
                 f"{len(self.cfg.grid.seeds)} distillation seeds of the mean over {self.cfg.eval.students} evaluation "
                 f"students. Protocol `strict` (select `{self.cfg.eval.select}`) never looks at test before the "
                 "final read; `paper` is the published best-of-test-evaluations protocol, shown only to compare "
                 "with the papers, whose numbers (where they have the cell) are in [brackets] on those rows.", ""]
        for ds, md, plots, grids in links:
            lines += [f"## {ds}", "", md, "",
                      *[f"![{p.stem}]({p.relative_to(root).as_posix()})" for p in plots], "",
                      "Synthetic sets at the largest budget (seed 0): " + ", ".join(
                          f"[{m}]({g.relative_to(root).as_posix()})" for m, g in grids if g.exists()), "",
                      f"Tables: [markdown](tables/{self.cfg.preset}/{ds}.md), [CSV](tables/{self.cfg.preset}/{ds}.csv),"
                      f" [LaTeX](tables/{self.cfg.preset}/{ds}.tex)", ""]
        with atomic_path(root / "README.md") as tmp:
            tmp.write_text("\n".join(lines) + "\n")

    # ---------------------------------------------------------------- grid
    def cells(self) -> list[tuple[str, str, int, int]]:
        g = self.cfg.grid
        return [(ds, m, b, s) for ds in self.cfg.datasets for m in g.methods for b in g.budgets for s in g.seeds]
