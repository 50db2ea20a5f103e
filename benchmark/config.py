"""Typed benchmark configuration.

Two documents share these sections: a *preset* (``benchmark/presets/<name>.yaml`` or a path), whose ``methods.<m>``
holds overrides applied to every cell, and *params.yaml*, written from a preset by ``mmdd init-params``, whose
``methods.<m>.<dataset>.b<budget>`` holds every cell's fully resolved parameters — the one document every stage
reads. Validation happens here, at the edge: unknown keys and bad values fail with a message naming the field and
the fix.
"""

from __future__ import annotations

import copy
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from benchmark.cross_arch import CrossArchConfig, check_cross_arch
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
    """Reference rows. ``epochs``/``lr``: the harness's full-data students (the evaluation optimiser: momentum,
    weight decay, lr drop). The full-data stage also writes like-for-like references: students trained with the
    experts' own optimiser and schedule, and the experts themselves at their final epoch and at ``expert_epochs``
    (e.g. the latest target epoch the raw-teacher methods match)."""

    epochs: int = 10
    lr: float = 0.1
    expert_epochs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [e for e in self.expert_epochs if isinstance(e, bool) or not isinstance(e, int) or e < 0]
        if bad:
            raise ValueError(f"full_data.expert_epochs must be non-negative epochs, got {bad}")


@dataclass
class TrackingConfig:
    """MLflow: ``uri`` empty = ``MLFLOW_TRACKING_URI`` or the project's absolute sqlite store."""

    enabled: bool = True
    uri: str = ""
    experiment_prefix: str = "mmdd"


@dataclass
class GridConfig:
    """The grid: every (dataset, method, budget, seed) is one cell."""

    methods: list[str] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self) -> None:
        if any(not isinstance(b, int) or isinstance(b, bool) or b <= 0 for b in self.budgets):
            raise ValueError(f"grid.budgets must be positive pair counts, got {self.budgets}")
        if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in self.seeds):
            raise ValueError(f"grid.seeds must be non-negative integers, got {self.seeds}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"grid.methods lists a method twice: {self.methods}")


@dataclass
class ReportConfig:
    """The report's statistics (docs/protocols.md#statistics). ``baseline``: the method every compared method is
    tested against; ``compare``: the methods compared pairwise (empty: every grid method not in ``coresets``);
    ``study``: the methods of the phased-teacher study (e.g. ``ptm-st@pt-only``), reported in their own section
    and compared among themselves, not in the main table."""

    baseline: str = "random"
    compare: list[str] = field(default_factory=list)
    coresets: list[str] = field(default_factory=lambda: ["random", "herding", "kcenter", "forgetting"])
    study: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.baseline, str) or not self.baseline:
            raise ValueError(f"report.baseline must be a method name, got {self.baseline!r}")
        for name in ("compare", "coresets", "study"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
                raise ValueError(f"report.{name} must be a list of method names, got {value!r}")
            if len(set(value)) != len(value):
                raise ValueError(f"report.{name} lists a method twice: {value}")


def budget_key(budget: int) -> str:
    """The key of a budget under ``methods.<m>.<dataset>`` in params.yaml."""
    return f"b{budget}"


ROLES = ("ranking", "smoke", "paper")


@dataclass
class BenchConfig:
    """A whole benchmark configuration. ``profile`` names the methods' default set that ``mmdd init-params``
    resolved (the preset's name unless the preset says otherwise); ``methods`` maps method → dataset →
    ``b<budget>`` → the cell's resolved parameters."""

    preset: str
    profile: str
    datasets: list[str]
    data: DataConfig
    text_encoder: str
    student: StudentConfig
    experts: ExpertConfig
    eval: EvalConfig
    full_data: FullDataConfig
    grid: GridConfig
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    methods: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    cross_arch: CrossArchConfig = field(default_factory=CrossArchConfig)  # docs/protocols.md#cross-architecture-evaluation
    # limits of a method run in a container (benchmark.runners.spec.SandboxLimits fields); none change a result
    sandbox: dict[str, Any] = field(default_factory=dict)
    # torch intra-op threads of every stage process: results are bitwise only for a fixed count (0: torch's default)
    threads: int = 0
    # what the preset's table may be used for: ``ranking`` (sized to rank methods with intervals), ``smoke`` (checks
    # that everything runs; its table ranks nothing), ``paper`` (the published settings)
    role: str = "ranking"

    def cell_params(self, method: str, dataset: str, budget: int) -> dict[str, Any]:
        """The resolved parameters of one cell; a clear error when params.yaml lacks them."""
        try:
            return dict(self.methods[method][dataset][budget_key(budget)])
        except (KeyError, TypeError):
            raise ValueError(f"params.yaml has no methods.{method}.{dataset}.{budget_key(budget)}: rerun "
                             f"`mmdd init-params --preset {self.preset}` (with your -S overrides) so every grid "
                             "cell has its resolved parameters") from None


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
    hints = typing.get_type_hints(cls)
    for name, value in doc.items():
        sub = _SUBSECTIONS.get((cls, name))
        if not sub:
            _check_type(f"{where}.{name}", value, hints.get(name, Any))
        kwargs[name] = _build(sub, value, f"{where}.{name}") if sub else value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"config section {where!r}: {exc}") from exc


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (parsed YAML) fits the field type ``hint``; types this cannot judge are accepted."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0] if args else Any) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return not isinstance(hint, type) or isinstance(value, hint)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint).replace("typing.", "")


def _check_type(where: str, value: Any, hint: Any) -> None:
    """A value of the wrong type fails here, naming the key, the value and the expected type."""
    if _matches(value, hint):
        return
    numeric_text = isinstance(value, str) and _is_number(value)
    fix = f" (YAML reads {value} as text: write a decimal point, e.g. 1.0e-3)" if numeric_text else ""
    raise ValueError(f"config value {where}={value!r} must be {_type_name(hint)}, not {type(value).__name__}{fix}: "
                     f"fix it in the params file or the -S {where}=... override")


_SUBSECTIONS = {(DataConfig, "shapes"): ShapesConfig}
_SECTIONS = {"data": DataConfig, "student": StudentConfig, "experts": ExpertConfig, "eval": EvalConfig,
             "full_data": FullDataConfig, "grid": GridConfig, "tracking": TrackingConfig,
             "report": ReportConfig, "cross_arch": CrossArchConfig}
PARAMS_FILE = "params.yaml"


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


def preset_path(preset: str) -> Path:
    """The YAML file of a preset name or path; an unknown name is an error listing the choices."""
    path = Path(preset)
    if path.suffix not in (".yaml", ".yml"):
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ValueError(f"unknown preset {preset!r}: choose one of {available_presets()} or pass a YAML path")
    return path


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping; a parse error names the file and the line instead of a traceback."""
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}{where} is not valid YAML ({getattr(exc, 'problem', exc)}): fix the file") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a YAML mapping of config sections")
    return doc


def load_preset(preset: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """A preset's document (``methods.<m>`` = flat overrides) with dotted overrides applied; not yet resolved."""
    return apply_overrides(read_yaml(preset_path(preset)), overrides)


def load_config(path: str | Path = PARAMS_FILE, overrides: list[str] | None = None) -> BenchConfig:
    """Load a resolved params document (``params.yaml`` written by ``mmdd init-params``)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: write it with `mmdd init-params --preset <name>` "
                         f"(presets: {available_presets()})")
    doc = apply_overrides(read_yaml(path), overrides)
    cfg = config_from_dict(doc)
    for m in cfg.grid.methods:
        for ds in cfg.datasets:
            for b in cfg.grid.budgets:
                cfg.cell_params(m, ds, b)  # every cell resolved, or a clear error now
    return cfg


def config_from_dict(doc: dict[str, Any]) -> BenchConfig:
    """Validate a configuration mapping into a :class:`BenchConfig` (``methods`` is taken as given)."""
    from benchmark.data.datasets import DATASETS

    top = {"preset", "profile", "role", "datasets", "text_encoder", "methods", "sandbox", "threads", *_SECTIONS}
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
    check_cross_arch(sections["cross_arch"], sections["student"].tower, sections["grid"].methods)
    from benchmark.encoders.text import text_encoder_dim

    encoder = doc.get("text_encoder", "minilm")
    student = sections["student"]
    student.text_dim = text_encoder_dim(encoder)
    methods = doc.get("methods") or {}
    if not isinstance(methods, dict):
        raise ValueError("config key 'methods' must map method names to parameters")
    sandbox = doc.get("sandbox") or {}
    if not isinstance(sandbox, dict):
        raise ValueError("config key 'sandbox' must map SandboxLimits fields to values (docs/security.md)")
    threads = doc.get("threads", 0)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads must be a non-negative integer (0: torch's default), got {threads!r}")
    role = doc.get("role", "ranking")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    preset = str(doc.get("preset", "custom"))
    return BenchConfig(preset=preset, profile=str(doc.get("profile") or preset), datasets=datasets,
                       text_encoder=encoder, methods=methods, sandbox=dict(sandbox), threads=threads, role=role,
                       **sections)
