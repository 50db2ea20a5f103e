"""The MLflow schema of a benchmark: experiments, runs, tags and metric names, mirroring the result table.

- One experiment per (dataset, preset): ``<prefix>/<preset>/<dataset>``, with a description.
- A parent run per table row, (method, budget) under one configuration: the aggregate over grid seeds, i.e. the
  mean, the 95 % Student-t half-width (``.ci95``) and the std over seeds, and ``seeds``.
- A child run per grid seed: its distillation (live loss curves, cost) and its evaluation, with the mean over its
  evaluation students and each student's value as a metric (``students.<name>``, step = student index).
- A run per reference row (full data, the experts), with the spread over its students or experts.
- Metric names say their protocol: ``test.strict.r_mean``, ``test.paper.r_mean``, ...
- Cross-architecture students (``cross_arch.towers``) as ``cross_arch.<tower>.test.strict.r_mean``, ..., on the
  seed run and aggregated over seeds on the row like ``test.*`` (the row's ``cross_arch.seeds`` counts them).

Pure functions, no MLflow import: :mod:`benchmark.tracking.recorder` writes what this module describes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict
from typing import Any, Iterable, Mapping

from benchmark.stages.cells import hash_json
from benchmark.stats import t_interval

# tags
KIND, LEVEL, KEY = "mmdd.kind", "mmdd.level", "mmdd.key"
AGGREGATE, SEED, REFERENCE = "aggregate", "seed", "reference"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training pages, not GenAI
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow's shared views: an experiment tag the UI loads by key
VIEW_KEY, COMPARE_VIEW_KEY, SEEDS_VIEW_KEY = "mmdd-ranking", "mmdd-compare", "mmdd-seeds"
CROSS_VIEW_KEY = "mmdd-cross-arch"
HEADLINE = "test.strict.r_mean"
CROSS_ARCH = "cross_arch"
# per-iteration log fields that are sampled indices, not measurements: recorded in the log file, not charted
NOT_CHARTED = frozenset({"step", "expert", "start_epoch"})


def experiment_name(prefix: str, preset: str, dataset: str) -> str:
    """``<prefix>/<preset>/<dataset>``: presets never share an experiment."""
    return f"{prefix}/{preset}/{dataset}"


def experiment_description(preset: str, role: str, dataset: str, seeds: Iterable[int]) -> str:
    """The experiment's note (shown above its runs table)."""
    seeds = list(seeds)
    return (f"mmdd-bench, preset **{preset}** ({role}) on **{dataset}**. One parent run per table row (method, "
            f"budget): `{HEADLINE}` is the mean over {len(seeds)} grid seed(s) {seeds}, `{HEADLINE}.ci95` its 95 % "
            "Student-t half-width, `seeds` how many were evaluated. Expand a parent for its seed runs (live "
            "distillation curves, cost, per-student values as `students.*` with step = student index). Reference "
            f"rows (full data, experts) are runs with tag `{KIND}` = `{REFERENCE}`. `test.strict.*` is the strict "
            "protocol (final-epoch students), `test.paper.*` the published one (best epoch on test).")


def group_key(preset: str, dataset: str, method: str, budget: int, params: Mapping[str, Any],
              evaluation: Mapping[str, Any], student: Mapping[str, Any]) -> str:
    """Identity of a table row: its seeds are aggregated only under the same configuration."""
    return hash_json({"preset": preset, "dataset": dataset, "method": method, "budget": budget, "params": params,
                      "eval": evaluation, "student": student})


def seed_key(group: str, seed: int) -> str:
    return hash_json({"group": group, "seed": seed})


def parent_name(method: str, budget: int) -> str:
    return f"{method}/b{budget}"


def seed_name(method: str, budget: int, seed: int) -> str:
    return f"{method}/b{budget}/s{seed}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def test_metrics(protocols: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.json's protocols as ``test.<protocol>.<metric>`` (mean over students) and ``….std``."""
    out: dict[str, float] = {}
    for proto, summary in protocols.items():
        for name, value in summary.items():
            if isinstance(value, dict) and "mean" in value:
                out[f"test.{proto}.{name}"] = float(value["mean"])
                out[f"test.{proto}.{name}.std"] = float(value["std"])
    return out


def student_metrics(protocols: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """Each evaluation student's (or expert's) values: ``students.test.<protocol>.<metric>`` at step = its index."""
    out = []
    for proto, summary in protocols.items():
        for k, student in enumerate(summary.get("students", [])):
            out += [(f"students.test.{proto}.{name}", float(v), k) for name, v in student.items()
                    if _is_number(v)]
    return out


def aggregate_metrics(per_seed: Mapping[int, Mapping[str, float]], prefix: str = "test.",
                      count: str = "seeds") -> dict[str, float]:
    """Parent metrics from each seed's ``<prefix>*`` means: mean over seeds, ``.ci95`` (95 % t half-width; absent for
    one seed) and ``.std`` over seeds, plus the seed count as ``count``."""
    out: dict[str, float] = {count: float(len(per_seed))}
    if not per_seed:
        return out
    names = sorted(set.intersection(*(set(m) for m in per_seed.values())))
    for name in names:
        if name.endswith(".std") or not name.startswith(prefix):
            continue
        values = [per_seed[s][name] for s in sorted(per_seed)]
        iv = t_interval(values)
        out[name] = iv.mean
        if iv.n > 1:
            out[f"{name}.ci95"] = iv.half_width
            out[f"{name}.std"] = statistics.stdev(values)
    return out


def cross_arch_metrics(res: Mapping[str, Any]) -> dict[str, float]:
    """A cross_arch.json's towers as ``cross_arch.<tower>.test.<protocol>.<metric>`` (mean over the tower's
    students) and ``….std``."""
    return {f"{CROSS_ARCH}.{tower}.{name}": v for tower, r in res.get("towers", {}).items()
            for name, v in test_metrics(r.get("protocols", {})).items()}


def history_metrics(records: Iterable[Mapping[str, Any]]) -> list[tuple[str, float, int]]:
    """Per-iteration log records as ``distill.<field>`` at their step (sampled indices left out)."""
    out = []
    for rec in records:
        step = int(rec.get("step", 0))
        out += [(f"distill.{k}", float(v), step) for k, v in rec.items()
                if k not in NOT_CHARTED and _is_number(v)
                and math.isfinite(float(v))]
    return out


def cost_metrics(distill_volatile: Mapping[str, Any] | None, eval_seconds: float | None = None) -> dict[str, float]:
    """What a cell cost and what it made: ``cost.*`` (seconds, memory) and ``set.*`` (pairs, bytes)."""
    d = distill_volatile or {}
    pick = {"cost.distill_seconds": d.get("seconds"), "cost.distill_sec_per_iter": d.get("sec_per_iter_mean"),
            "cost.distill_peak_mem_mb": d.get("peak_mem_mb_max"), "cost.teacher_io_seconds": d.get("teacher_io_s"),
            "cost.distill_cpu_seconds": d.get("cpu_seconds"), "cost.distill_peak_rss_mb": d.get("peak_rss_mb"),
            "cost.expert_bytes_read": d.get("expert_bytes_read"),
            "cost.eval_seconds": eval_seconds, "set.pairs": d.get("pairs"), "set.bytes": d.get("bytes")}
    return {k: float(v) for k, v in pick.items() if _is_number(v)}


def _col(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"


def _bar(metric: str, title: str) -> dict[str, Any]:
    return {"uuid": f"mmdd-{metric}", "type": "BAR", "metricKey": metric, "dataAccessKey": metric,
            "metricSectionId": "mmdd", "runsCountToCompare": 50, "deleted": False, "isGenerated": False,
            "displayName": title}


def view_states() -> dict[str, dict[str, Any]]:
    """The runs-page views ``mmdd ui`` opens, in MLflow's shared-view format (stored as experiment tags).

    ``mmdd-ranking``: one row per result-table row (methods and references), best strict recall first, with its
    interval and seed count. ``mmdd-compare``: the methods' rows only (no full-data bar squeezing them), for the
    chart mode's bars of strict and paper recall. ``mmdd-seeds``: every seed run with method, budget and seed,
    grouped by method.
    """
    common = {"orderByKey": _col("metrics", HEADLINE), "orderByAsc": False, "startTime": "ALL",
              "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
              "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True}
    rows = [_col("params", "method"), _col("params", "budget"), _col("metrics", HEADLINE),
            _col("metrics", f"{HEADLINE}.ci95"), _col("metrics", "seeds"), _col("metrics", "test.paper.r_mean")]
    charts = {"compareRunSections": [{"uuid": "mmdd", "name": "Mean recall over seeds", "display": True,
                                      "isReordered": False}],
              "compareRunCharts": [_bar(HEADLINE, "strict mean recall (mean over seeds)"),
                                   _bar("test.paper.r_mean", "paper-protocol mean recall (mean over seeds)"),
                                   _bar(f"{HEADLINE}.ci95", "strict: 95 % t half-width over seeds")]}
    return {
        VIEW_KEY: {**common, **charts, "searchFilter": f"tags.`{LEVEL}` != '{SEED}'", "selectedColumns": rows},
        COMPARE_VIEW_KEY: {**common, **charts, "searchFilter": f"tags.`{LEVEL}` = '{AGGREGATE}'",
                           "selectedColumns": rows},
        SEEDS_VIEW_KEY: {**common, "searchFilter": f"tags.`{LEVEL}` = '{SEED}'",
                         "selectedColumns": [_col("params", "method"), _col("params", "budget"),
                                             _col("params", "seed"), _col("metrics", HEADLINE),
                                             _col("metrics", "test.paper.r_mean"),
                                             _col("metrics", "cost.distill_seconds")],
                         "groupBy": {"aggregateFunction": "average",
                                     "groupByKeys": [{"mode": "param", "groupByData": "method"}]},
                         "chartsSearchFilter": HEADLINE},
    }


def cross_arch_view_state(towers: Iterable[str]) -> dict[str, Any]:
    """``mmdd-cross-arch``: the methods' rows with the distillation student's strict recall and each tower's beside
    it (mean over seeds and its 95 % half-width), in chart mode one bar chart per tower."""
    towers = list(towers)
    cols = [_col("params", "method"), _col("params", "budget"), _col("metrics", HEADLINE)]
    for t in towers:
        cols += [_col("metrics", f"{CROSS_ARCH}.{t}.{HEADLINE}"), _col("metrics", f"{CROSS_ARCH}.{t}.{HEADLINE}.ci95")]
    bars = [_bar(HEADLINE, "distillation student: strict mean recall")]
    bars += [_bar(f"{CROSS_ARCH}.{t}.{HEADLINE}", f"{t}: strict mean recall (mean over seeds)") for t in towers]
    return {"orderByKey": _col("metrics", HEADLINE), "orderByAsc": False, "startTime": "ALL",
            "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
            "runsHiddenMode": "SHOW_ALL", "hideEmptyCharts": True,
            "searchFilter": f"tags.`{LEVEL}` = '{AGGREGATE}'", "selectedColumns": cols,
            "compareRunSections": [{"uuid": "mmdd", "name": "Cross-architecture mean recall over seeds",
                                    "display": True, "isReordered": False}],
            "compareRunCharts": bars}


def cross_arch_view_tag(towers: Iterable[str]) -> tuple[str, str]:
    """The experiment tag of the cross-architecture view over ``towers``."""
    return VIEW_TAG_PREFIX + CROSS_VIEW_KEY, json.dumps(cross_arch_view_state(towers))


def experiment_view_tags() -> dict[str, str]:
    """The experiment tags behind ``mmdd ui``'s landing views: the views and the model-training pages."""
    tags = {VIEW_TAG_PREFIX + key: json.dumps(state) for key, state in view_states().items()}
    return {**tags, EXPERIMENT_KIND[0]: EXPERIMENT_KIND[1]}


def landing_url(base: str, experiment_id: str, view: str = VIEW_KEY) -> str:
    """The URL of a view of an experiment's runs; the compare view opens in chart mode."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={view}"
    return url + ("&compareRunsMode=CHART" if view in (COMPARE_VIEW_KEY, CROSS_VIEW_KEY) else "")


def eval_settings(cfg) -> dict[str, Any]:
    """The evaluation settings a row depends on (``cfg`` a BenchConfig)."""
    return asdict(cfg.eval)
