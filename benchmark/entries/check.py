"""``mmdd check-entry``: verify a method entry on the tiny preset, rule by rule (see :mod:`benchmark.entries`)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECK_PRESET = "tiny"
CHECK_DATASET = "shapes"


@dataclass
class CheckResult:
    rule: str
    ok: bool | None  # None: skipped
    detail: str

    def line(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[self.ok]
        return f"{mark}  {self.rule:13s} {self.detail}"


@dataclass
class EntryReport:
    name: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok is not False for r in self.results)

    @property
    def failed(self) -> CheckResult | None:
        return next((r for r in self.results if r.ok is False), None)

    def add(self, rule: str, ok: bool | None, detail: str) -> bool:
        self.results.append(CheckResult(rule, ok, detail))
        (log.info if ok is not False else log.error)("check-entry %s: %s", self.name, self.results[-1].line())
        return ok is not False

    def render(self) -> str:
        head = f"check-entry {self.name}: {'passed' if self.ok else 'FAILED'}"
        return "\n".join([head, *(r.line() for r in self.results)])


class _Interrupt(BaseException):
    """Raised by the interrupting checkpointer, like a kill would stop the process (not an Exception)."""


def default_data_root() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "mmdd" / "check-entry" / "data"


def load_project_entry(name: str, project: Path) -> type:
    """Register ``name`` from an out-of-tree project's ``mmdd.methods`` entry point (as installing it would)."""
    from benchmark.interface import Method
    from benchmark.registry import ENTRY_POINT_GROUP, register_method

    pyproject = Path(project) / "pyproject.toml"
    if not pyproject.is_file():
        raise ValueError(f"{project} has no pyproject.toml: pass the directory made by `mmdd new-method --out-of-tree`")
    eps = tomllib.loads(pyproject.read_text()).get("project", {}).get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
    if name not in eps:
        raise ValueError(f"{pyproject} declares no entry point {name!r} in "
                         f"[project.entry-points.\"{ENTRY_POINT_GROUP}\"] (found {sorted(eps)}): add "
                         f"`{name} = \"<module>:<Class>\"`")
    src = Path(project) / "src"
    path = str((src if src.is_dir() else Path(project)).resolve())
    if path not in sys.path:
        sys.path.insert(0, path)
    module, _, qualname = eps[name].partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Method)):
        raise ValueError(f"entry point {name} = {eps[name]!r} is not a benchmark.interface.Method subclass")
    return register_method(name)(obj)


def _diff(a, b) -> str | None:
    """None when two DistilledSets hold identical phases, else where they first differ."""
    if len(a.phases) != len(b.phases):
        return f"{len(a.phases)} vs {len(b.phases)} phases"
    for k, (pa, pb) in enumerate(zip(a.phases, b.phases, strict=True)):
        if pa.scalars() != pb.scalars():
            return f"phase {k} scalars {pa.scalars()} vs {pb.scalars()}"
        ta, tb = pa.tensors(), pb.tensors()
        if ta.keys() != tb.keys():
            return f"phase {k} tensors {sorted(ta)} vs {sorted(tb)}"
        for name in ta:
            x, y = ta[name].detach().float().cpu(), tb[name].detach().float().cpu()
            if x.shape != y.shape:
                return f"phase {k} {name} shapes {list(x.shape)} vs {list(y.shape)}"
            if not torch.equal(x, y):
                return f"phase {k} {name} differs (max |delta| = {(x - y).abs().nan_to_num(float('inf')).max():.3g})"
    return None


class _Checker:
    """Runs the rules of one entry against tiny-preset data; every run writes under a private temporary root."""

    def __init__(self, name: str, data_root: Path, work: Path, budget: int | None, seed: int):
        self.name, self.data_root, self.work, self.seed = name, Path(data_root), work, seed
        self.budget = budget or self.context().cfg.grid.budgets[0]
        self.runs = 0

    def context(self, overrides: list[str] | None = None, tag: str = ""):
        """A stage context of the tiny preset with only this entry in the grid (and ``overrides``)."""
        from benchmark.params import resolve
        from benchmark.paths import Layout
        from benchmark.stages.context import StageContext

        self.runs = getattr(self, "runs", 0) + 1
        grid = [f"grid.methods=[{self.name}]", f"datasets=[{CHECK_DATASET}]"]
        if getattr(self, "budget", None):
            grid.append(f"grid.budgets=[{self.budget}]")
        cfg = resolve(CHECK_PRESET, grid + list(overrides or []))
        return StageContext(cfg, Layout(self.data_root.resolve(), self.work / f"run{self.runs}{tag}"), progress=False)

    def cell(self):
        from benchmark.stages.cells import Cell

        return Cell(CHECK_DATASET, self.name, self.budget, self.seed)

    def prepare(self) -> None:
        from benchmark.stages.embed import embed
        from benchmark.stages.experts import experts
        from benchmark.stages.fetch import fetch
        from benchmark.stages.prepare import method_requirements, prepare

        ctx = self.context(tag="-prepare")
        fetch(ctx, CHECK_DATASET)
        embed(ctx, CHECK_DATASET)
        reqs = method_requirements(ctx, CHECK_DATASET, self.name)
        if reqs:
            experts(ctx, CHECK_DATASET)
            prepare(ctx, CHECK_DATASET, self.name)

    def distill(self, runner: str = "local"):
        from benchmark.distilled import DistilledSet
        from benchmark.stages.distill import distill

        from benchmark.io import read_json

        ctx = self.context(tag=f"-{runner}")
        cell_dir = distill(ctx, self.cell(), force=True, runner=runner)
        dset = DistilledSet.load(cell_dir / "distilled")
        dset.meta["where"] = read_json(cell_dir / "distill.volatile.json")  # runner, image, seconds
        return ctx, dset

    def interrupted_then_resumed(self):
        """(set after an interruption and a resume | None when no checkpoint was written, loaded?)."""
        from benchmark.interface import Checkpointer

        class Interrupting(Checkpointer):
            def save(self, tensors, state):
                super().save(tensors, state)
                raise _Interrupt

        class Recording(Checkpointer):
            loaded = False

            def load(self):
                out = super().load()
                type(self).loaded = type(self).loaded or out is not None
                return out

        from benchmark.stages.distill import make_task

        ctx = self.context([f"methods.{self.name}.checkpoint_every=1"], tag="-resume")
        work = self.work / "resume-cell"
        for ckpt_cls in (Interrupting, Recording):
            impl, task = make_task(ctx, self.cell(), work)
            task.checkpoint = ckpt_cls(task.checkpoint.directory, task.checkpoint.every)
            torch.manual_seed(self.seed)
            try:
                out = impl.distill(task)
            except _Interrupt:
                continue
            if ckpt_cls is Interrupting:
                return None, False
            return out, Recording.loaded
        raise AssertionError("unreachable")


def check_entry(name: str, *, project: Path | None = None, data_root: Path | None = None,
                budget: int | None = None, seed: int = 0, docker: str = "auto") -> EntryReport:
    """Verify the entry ``name`` on the tiny preset (see the module doc); stops at the first failed rule.

    ``project``: an out-of-tree package directory to register from (not yet installed). ``data_root``: where the
    tiny data is prepared (reused across checks). ``docker``: ``auto`` (run the container check when Docker
    answers), ``off``, or ``require``.
    """
    from benchmark.distilled import InvalidDistilledSet
    from benchmark.interface import Method
    from benchmark.registry import get_method

    if docker not in ("auto", "off", "require"):
        raise ValueError(f"docker must be auto, off or require, got {docker!r}")
    report = EntryReport(name)
    try:
        if project is not None:
            load_project_entry(name, project)
        cls = get_method(name)
        if not issubclass(cls, Method) or cls.distill is Method.distill:
            raise ValueError(f"{cls.__qualname__} must subclass benchmark.interface.Method and implement distill()")
        params = cls.resolve_params(CHECK_PRESET, CHECK_DATASET, budget or 1)
        cls.requirements(params, budget or 1)
    except Exception as exc:  # noqa: BLE001 - any failure to load is this rule's verdict
        report.add("registers", False, f"rule 'registers': {exc}")
        return report
    report.add("registers", True, f"{cls.__module__}.{cls.__qualname__}; defaults for profiles {cls.profiles()}")

    with tempfile.TemporaryDirectory(prefix="mmdd-check-entry-") as tmp:
        checker = _Checker(name, data_root or default_data_root(), Path(tmp), budget, seed)
        checker.prepare()
        try:
            ctx, ref = checker.distill()
        except InvalidDistilledSet as exc:
            report.add("valid", False, str(exc))
            return report
        except Exception as exc:  # noqa: BLE001
            report.add("valid", False, f"rule 'runs': the method raised {type(exc).__name__}: {exc}")
            return report
        plain = checker.budget * (3 * ctx.image_size ** 2 + ctx.student.text_dim) * 4
        report.add("valid", True, f"{ref.pairs} pairs <= budget {checker.budget}; {ref.nbytes:,} bytes "
                                  f"({ref.nbytes / plain:.2f}x the bytes of {checker.budget} real pairs)")

        _, again = checker.distill()
        diff = _diff(ref, again)
        if not report.add("deterministic", diff is None, f"rule 'deterministic': two runs with seed {seed} differ: "
                          f"{diff}" if diff else f"two runs with seed {seed} are identical"):
            return report

        if "checkpoint_every" not in params:
            report.add("resumes", True, "no 'checkpoint_every' parameter: an interrupted run restarts from scratch "
                                        "(deterministic, so it reaches the same set)")
        else:
            resumed, loaded = checker.interrupted_then_resumed()
            if resumed is None:
                report.add("resumes", False, "rule 'resumes': with checkpoint_every=1 the method never called "
                                             "task.checkpoint.save(); save its state every checkpoint_every iterations")
                return report
            diff = _diff(ref, resumed)
            if not loaded:
                report.add("resumes", False, "rule 'resumes': after an interruption the rerun did not load the "
                                             "checkpoint; call task.checkpoint.load() before iterating")
                return report
            if diff:
                report.add("resumes", False, f"rule 'resumes': the resumed run differs from an uninterrupted one: "
                                             f"{diff} (checkpoint every piece of state, generators included)")
                return report
            report.add("resumes", True, "interrupted after its first checkpoint, resumed to the identical set")

        _check_container(report, checker, ref, docker)
    return report


def _check_container(report: EntryReport, checker: _Checker, ref, docker: str) -> None:
    from benchmark.runners.images import DockerError, docker_unavailable_reason

    if docker == "off":
        report.add("container", None, "skipped (--docker off)")
        return
    reason = docker_unavailable_reason()
    if reason is not None:
        report.add("container", False if docker == "require" else None, f"Docker unavailable: {reason}")
        return
    try:
        _, out = checker.distill(runner="docker")
    except DockerError as exc:
        report.add("container", False, f"rule 'container': {exc}")
        return
    except Exception as exc:  # noqa: BLE001
        report.add("container", False, f"rule 'container': {type(exc).__name__}: {exc}")
        return
    image = out.meta["where"].get("container_image", "?")
    diff = _diff(ref, out)
    if diff is None:
        report.add("container", True, f"ran in {image} (network off, data read-only); identical to the local run")
    else:  # a different torch build in the image may change the last bits; report it, the reviewer decides
        report.add("container", True, f"ran in {image} (network off, data read-only); differs from the local run: "
                                      f"{diff}")
