"""Shared trajectory-matching engine (docs/methods.md#engine): MTT-VL, TESLA-VL, LoRS, PTM-ST and RepBlend are
configurations of it.

* :mod:`.config` — typed, validated options (:class:`EngineConfig` from a flat params dict).
* :mod:`.engine` — the inner loops (``full`` graph/adjoint, ``tesla``), their gradients, and the outer loop.
* :mod:`.similarity` — ``none | full | lowrank`` learned target similarity with per-batch gather/scatter.
* :mod:`.teacher` — raw or shortcut teachers reading only the two epochs an iteration needs (and in-memory ones).
* :mod:`.heads` — the frozen-encoder + two-heads student (``student = heads``) and its head-only experts.
* :mod:`.blend` — representation blending (``blend_alpha``): one mixing matrix per inner step.
* :mod:`.shortcut` — shortcut trajectories: build, compact store, reader.
* :mod:`.artifacts` — the ``shortcut`` artifact kind the harness prepares for a method that asks for it.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from benchmark.distilled import DistilledSet
from benchmark.interface import DistillTask, Method
from benchmark.requirements import EXPERTS, Requirement
from methods.matching.artifacts import shortcut_requirement
from methods.matching.config import ENGINE_DEFAULTS, ConfigError, EngineConfig
from methods.matching.engine import DistillationDiverged, MatchingEngine

log = logging.getLogger(__name__)

__all__ = ["ENGINE_DEFAULTS", "ConfigError", "DistillationDiverged", "EngineConfig", "MatchingEngine",
           "MatchingMethod", "nearest_row"]


def nearest_row(table: dict[str, dict[int, Any]], dataset: str, budget: int, method: str) -> Any:
    """The published row for (dataset, budget); unknown datasets use Flickr30k's rows, unknown budgets the nearest
    published budget (with a log line saying so). Used only when ``mmdd init-params`` resolves the paper profile."""
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
    """A trajectory-matching method = engine defaults per profile; it needs the experts, and the shortcut
    artifacts of any phase whose teacher is ``shortcut(start, end)``."""

    @classmethod
    def default_params(cls, profile: str, dataset: str, budget: int) -> dict[str, Any]:
        if profile == "paper":
            return cls.paper_params(dataset, budget)
        params = dict(ENGINE_DEFAULTS, **super().default_params(profile, dataset, budget))
        if isinstance(params.get("batch_size"), int):  # small budgets: a batch cannot exceed the pairs
            params["batch_size"] = max(1, min(params["batch_size"], budget))
        return params

    @classmethod
    def paper_params(cls, dataset: str, budget: int) -> dict[str, Any]:
        return dict(ENGINE_DEFAULTS, **cls.defaults["paper"])

    @classmethod
    def requirements(cls, params: dict[str, Any], budget: int) -> list[Requirement]:
        reqs = [Requirement(EXPERTS)]
        for ph in EngineConfig.from_params(params, budget).phases:
            if ph.teacher.kind == "shortcut" and shortcut_requirement(ph.teacher) not in reqs:
                reqs.append(shortcut_requirement(ph.teacher))
        return reqs

    def distill(self, task: DistillTask) -> DistilledSet:
        return MatchingEngine(task, EngineConfig.from_params(task.params, task.budget), self.name).run()
