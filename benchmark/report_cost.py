"""The cost table (docs/reproducibility.md#cost-measurements): per method and budget, what distilling one cell cost
on this machine — wall and CPU seconds, peak memory, expert storage read, each the mean over the grid seeds ± the 95 %
t half-width — beside the set's size and the storage the method's inputs occupy (experts: shared by every method
that reads them, stated once; prepared artifacts: the method's own).

Measured numbers are not functions of the inputs, so this table is written to ``results/cost/<preset>/`` (git- and
DVC-ignored), never to a stage's declared outputs, and labelled with the machine that measured it.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from benchmark.report import MD, Table, fmt_bytes, to_csv, to_markdown
from benchmark.stats import t_interval

MEASURED = ("seconds", "cpu_seconds", "peak_rss_mb", "expert_bytes_read")


@dataclass
class CostRow:
    """One (method, budget)'s costs: the mean over its measured cells (seeds) of each of :data:`MEASURED` (None: not
    measured) and the 95 % t half-width (None: fewer than two measured cells)."""

    method: str
    budget: int
    cells: int
    measured: dict[str, float | None]
    half_width: dict[str, float | None]
    set_bytes: int | None
    experts_bytes: int | None  # the shared experts directory, when the method reads experts
    prepared_bytes: int | None  # the method's own prepared directory


def dir_bytes(path: Path) -> int | None:
    """Total size of the regular files under ``path`` (None when it does not exist)."""
    if not path.is_dir():
        return None
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cost_row(method: str, budget: int, volatiles: Sequence[dict[str, Any]], set_bytes: Iterable[int],
             experts_bytes: int | None, prepared_bytes: int | None) -> CostRow:
    measured, half = {}, {}
    for key in MEASURED:
        vals = [float(v[key]) for v in volatiles if v.get(key) is not None]
        measured[key] = statistics.fmean(vals) if vals else None
        half[key] = t_interval(vals).half_width if len(vals) > 1 else None
    sizes = list(set_bytes)
    return CostRow(method, budget, len(volatiles), measured, half, max(sizes) if sizes else None, experts_bytes,
                   prepared_bytes)


def machine_label(environment: dict[str, Any]) -> str:
    """The CPU model and core count of this machine, plus the recorded environment's kernel family and threads."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (f"{model}, {os.cpu_count()} logical CPUs, torch {environment.get('packages', {}).get('torch')} "
            f"({environment.get('torch_cpu_capability')}, {environment.get('torch_threads')} threads)")


def _fmt(x: float | None, digits: int = 1, half: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" + ("" if half is None else f" ± {half:.{digits}f}")


def _bytes(x: float | None, half: float | None) -> str:
    if x is None:
        return "-"
    return fmt_bytes(int(x)) + ("" if not half else f" ± {fmt_bytes(int(round(half)))}")  # 0: the same every seed


def cost_table(dataset: str, rows: Sequence[CostRow], machine: str) -> Table:
    def cell(r: CostRow, key: str, digits: int = 1) -> str:
        return _fmt(r.measured[key], digits, r.half_width[key])

    body = [[MD.esc(r.method), str(r.budget), str(r.cells), cell(r, "seconds"), cell(r, "cpu_seconds"),
             cell(r, "peak_rss_mb", 0), _bytes(r.measured["expert_bytes_read"], r.half_width["expert_bytes_read"]),
             fmt_bytes(r.set_bytes), "shared" if r.experts_bytes is not None else "-", fmt_bytes(r.prepared_bytes)]
            for r in rows]
    shared = next((r.experts_bytes for r in rows if r.experts_bytes is not None), None)
    caption = (f"Distillation cost per cell on {dataset}, measured on {machine}: wall and CPU seconds of the "
               "method's run, the process's peak resident memory (the high-water mark of the process that ran the "
               "cell, so under `mmdd bench`'s persistent workers an upper bound that includes earlier tasks), expert "
               "storage read (experts, shortcuts, head experts), each the mean over the cells (seeds) ± the 95 % t "
               "half-width; the synthetic set's bytes, and storage written for its inputs")
    notes = [f"Experts (written once per dataset, read by every method marked shared): {fmt_bytes(shared)}."
             if shared is not None else "No method reads the experts.",
             "Machine measurements: not a pure function of the inputs, so outside every DVC-hashed output "
             "(docs/reproducibility.md#cost-measurements)."]
    return Table(["method", "budget", "cells", "wall s", "CPU s", "peak RSS MB", "experts read", "set bytes",
                  "experts", "prepared"], "lrrrrrrrcr", body, caption, f"tab:{dataset}-cost", notes)


def cost_records(rows: Sequence[CostRow]) -> list[dict[str, Any]]:
    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    return [{"method": r.method, "budget": r.budget, "cells": r.cells,
             **{k: num(v) for k, v in r.measured.items()}, **{f"{k}_ci95": num(v) for k, v in r.half_width.items()},
             "set_bytes": "" if r.set_bytes is None else r.set_bytes,
             "experts_bytes_shared": "" if r.experts_bytes is None else r.experts_bytes,
             "prepared_bytes": "" if r.prepared_bytes is None else r.prepared_bytes} for r in rows]


def write_cost(out_dir: Path, dataset: str, rows: Sequence[CostRow], machine: str) -> list[Path]:
    """``<out_dir>/<ds>.md`` and ``.csv``."""
    from benchmark.io import atomic_path

    paths = []
    for suffix, text in ((".md", to_markdown(cost_table(dataset, rows, machine)) + "\n"),
                         (".csv", to_csv(cost_records(rows)))):
        path = out_dir / f"{dataset}{suffix}"
        with atomic_path(path) as tmp:
            tmp.write_text(text)
        paths.append(path)
    return paths
