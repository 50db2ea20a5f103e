"""Typed benchmark configuration: a preset YAML (``benchmark/presets/<name>.yaml`` or a path) plus dotted overrides.

Validation happens here, at the edge: unknown keys and bad values fail with a message naming the field and the fix.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from benchmark.evaluation import EvalConfig
from benchmark.experts.train import ExpertConfig
from benchmark.models.student import StudentConfig

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass
class ShapesConfig:
    seed: int = 0
    n_train: int = 1000
    n_val: int = 200
    n_test: int = 500
    image_size: int = 32
    captions_per_image: int = 5


@dataclass
class DataConfig:
    root: str = "data"
    max_words: int = 30
    norm: str = "clip"
    train_augment: str = "none"
    init_transform: str = "test"
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    sources: dict[str, Any] = field(default_factory=dict)


@dataclass
class FullDataConfig:
    epochs: int = 10
    lr: float = 0.1


@dataclass
class ShortcutConfig:
    """Segments ``[start, end]`` of the expert trajectories turned into shortcut (straight-line) teachers."""

    segments: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for seg in self.segments:
            if len(seg) != 2 or not 0 <= seg[0] < seg[1]:
                raise ValueError(f"shortcut.segments entries must be [start, end] with 0 <= start < end, got {seg}")


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` empty = ``MLFLOW_TRACKING_URI`` or the project's absolute sqlite store."""

    enabled: bool = True
    uri: str = ""
    experiment_prefix: str = "mmdd"


@dataclass
class GridConfig:
    """The grid. ``groups`` (written by ``mmdd init-params``) splits ``methods`` by what their DVC stage depends
    on: ``plain`` (training data only), ``experts`` (+ expert trajectories), ``shortcut`` (+ shortcut teachers)."""

    methods: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    groups: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(b <= 0 for b in self.budgets):
            raise ValueError(f"grid.budgets must be positive pair counts, got {self.budgets}")

    def check_groups(self) -> None:
        if self.groups:
            grouped = sorted(m for ms in self.groups.values() for m in (ms or []))
            if grouped != sorted(self.methods):
                raise ValueError(f"grid.groups {self.groups} must partition grid.methods {self.methods}: "
                                 "rerun `mmdd init-params`")


@dataclass
class BenchConfig:
    """A whole benchmark configuration (one preset)."""

    preset: str
    datasets: list[str]
    data: DataConfig
    text_encoder: str
    student: StudentConfig
    experts: ExpertConfig
    eval: EvalConfig
    full_data: FullDataConfig
    grid: GridConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Per-dataset paper settings (e.g. tower, budgets) live in method defaults; this maps dataset -> extra fields.
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def method_overrides(self, method: str) -> dict[str, Any]:
        return dict(self.methods.get(method, {}) or {})


def _build(cls, doc: Any, where: str):
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ValueError(f"config section {where!r} must be a mapping, got {type(doc).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + '.' + k for k in unknown)}; "
                         f"valid keys: {sorted(known)}")
    kwargs = {}
    for name, value in doc.items():
        sub = _SUBSECTIONS.get((cls, name))
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"config section {where!r}: {exc}") from exc


_SUBSECTIONS = {(DataConfig, "shapes"): ShapesConfig}
_SECTIONS = {"data": DataConfig, "student": StudentConfig, "experts": ExpertConfig, "eval": EvalConfig,
             "full_data": FullDataConfig, "grid": GridConfig, "tracking": TrackingConfig,
             "shortcut": ShortcutConfig}


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def apply_overrides(doc: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a nested dict."""
    doc = copy.deepcopy(doc)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        node = doc
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_value(value)
    return doc


def load_config(preset: str = "quick", overrides: list[str] | None = None) -> BenchConfig:
    """Load a preset by name (see :func:`available_presets`) or YAML path, then apply dotted overrides."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ValueError(f"unknown preset {preset!r}: choose one of {available_presets()} or pass a YAML path")
    doc = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides)
    return config_from_dict(doc)


def config_from_dict(doc: dict[str, Any]) -> BenchConfig:
    """Validate a configuration mapping into a :class:`BenchConfig`."""
    from benchmark.data.datasets import DATASETS

    top = {"preset", "datasets", "text_encoder", "methods", *_SECTIONS}
    unknown = sorted(set(doc) - top)
    if unknown:
        raise ValueError(f"unknown top-level config key(s) {unknown}; valid keys: {sorted(top)}")
    datasets = list(doc.get("datasets") or [])
    for ds in datasets:
        if ds not in DATASETS:
            raise ValueError(f"unknown dataset {ds!r} in 'datasets': choose from {sorted(DATASETS)}")
    sections = {name: _build(cls, doc.get(name), name) for name, cls in _SECTIONS.items()}
    from benchmark.registry import get_method

    for m in sections["grid"].methods:
        get_method(m)  # unknown names fail here, naming the registered choices
    sections["grid"].check_groups()
    from benchmark.encoders.text import text_encoder_dim

    encoder = doc.get("text_encoder", "minilm")
    student = sections["student"]
    student.text_dim = text_encoder_dim(encoder)
    methods = doc.get("methods") or {}
    if not isinstance(methods, dict):
        raise ValueError("config key 'methods' must map method names to parameter overrides")
    return BenchConfig(preset=str(doc.get("preset", "custom")), datasets=datasets, text_encoder=encoder,
                       methods=methods, raw=doc, **sections)
