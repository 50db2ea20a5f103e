"""Shared trajectory-matching engine (DESIGN §3): MTT-VL, TESLA-VL, LoRS and PTM-ST are configurations of it.

* :mod:`.config` — typed, validated options (:class:`EngineConfig` from a flat params dict).
* :mod:`.engine` — the inner loops (``full`` graph/adjoint, ``tesla``), their gradients, and the outer loop.
* :mod:`.similarity` — ``none | full | lowrank`` learned target similarity with per-batch gather/scatter.
* :mod:`.teacher` — raw or shortcut teachers reading only the two epochs an iteration needs.
* :mod:`.shortcut` — PTM-ST shortcut trajectories: build, compact store, reader (``mmdd shortcut``).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from benchmark.distilled import DistilledSet
from benchmark.interface import DistillTask, Method
from methods.matching.config import (ENGINE_DEFAULTS, BugCompat, ConfigError, EngineConfig, PhaseSpec,
                                     SimilaritySpec, TeacherSpec)
from methods.matching.engine import DistillationDiverged, Matcher, MatchingEngine
from methods.matching.shortcut import (ShortcutCollection, ShortcutTrajectory, build_shortcuts,
                                       default_shortcut_dir, shortcut_bytes_report)

log = logging.getLogger(__name__)

__all__ = ["ENGINE_DEFAULTS", "BugCompat", "ConfigError", "EngineConfig", "PhaseSpec", "SimilaritySpec",
           "TeacherSpec", "DistillationDiverged", "Matcher", "MatchingEngine", "MatchingMethod", "ShortcutCollection",
           "ShortcutTrajectory", "build_shortcuts", "default_shortcut_dir", "shortcut_bytes_report", "nearest_row",
           "shortcut_segments"]


def shortcut_segments(params: dict[str, Any], budget: int) -> list[tuple[int, int]]:
    """The (start, end) shortcut segments a method's resolved params use, in phase order without repeats — what the
    ``shortcut`` stage must build (with :func:`build_shortcuts`) before ``distill``."""
    cfg = EngineConfig.from_params(params, budget)
    out: list[tuple[int, int]] = []
    for ph in cfg.phases:
        if ph.teacher.kind == "shortcut" and (ph.teacher.start, ph.teacher.end) not in out:
            out.append((ph.teacher.start, int(ph.teacher.end)))
    return out


def nearest_row(table: dict[str, dict[int, Any]], dataset: str, budget: int, method: str) -> Any:
    """The published row for (dataset, budget); unknown datasets use Flickr30k's rows, unknown budgets the nearest
    published budget (with a log line saying so)."""
    rows = table.get(dataset)
    if rows is None:
        log.warning("%s: no published settings for dataset %r; using flickr30k's", method, dataset)
        rows = table["flickr30k"]
    if budget in rows:
        return rows[budget]
    near = min(rows, key=lambda b: (abs(b - budget), b))
    log.warning("%s: no published settings for budget %d; using those of budget %d", method, budget, near)
    return rows[near]


class MatchingMethod(Method):
    """A registered trajectory-matching method = a set of engine defaults per preset."""

    needs_experts: ClassVar[bool] = True
    defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def default_params(cls, preset: str, dataset: str, budget: int) -> dict[str, Any]:
        if preset == "paper":
            return cls.paper_params(dataset, budget)
        params = dict(ENGINE_DEFAULTS, **cls.defaults.get(preset, cls.defaults["quick"]))
        if isinstance(params.get("batch_size"), int):  # small budgets: a batch cannot exceed the pairs
            params["batch_size"] = max(1, min(params["batch_size"], budget))
        return params

    @classmethod
    def paper_params(cls, dataset: str, budget: int) -> dict[str, Any]:
        return dict(ENGINE_DEFAULTS, **cls.defaults["paper"])

    def config(self, task: DistillTask) -> EngineConfig:
        params = dict(self.default_params(task.preset, task.dataset, task.budget))
        params.update(task.params or {})
        return EngineConfig.from_params(params, task.budget)

    def distill(self, task: DistillTask) -> DistilledSet:
        return MatchingEngine(task, self.config(task), self.name).run()
