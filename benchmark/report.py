"""Tables over the grid: per dataset and protocol, rows method × budget, each metric as ``mean ± h`` where h is the
half-width of the 95 % Student-t interval over distillation seeds (:mod:`benchmark.stats`); paired comparisons and
a tie-aware ranking on the headline metric; the summary JSON and the preset's results page.

A cell's value is the mean over its evaluation students. A row with a single run (a reference such as full data, or
a grid with one seed) has no interval over seeds: its ± is the std over its evaluation students, and the row says so.
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tabulate import tabulate

from benchmark.convergence import TOLERANCE, converged
from benchmark.io import atomic_path, read_json
from benchmark.registry import VARIANT_SEP
from benchmark.stats import ALPHA, Comparison, Interval, Ranked, compare, rank, spread_interval, t_interval

COLUMNS = (("ir1", "IR@1"), ("ir5", "IR@5"), ("ir10", "IR@10"), ("tr1", "TR@1"), ("tr5", "TR@5"), ("tr10", "TR@10"),
           ("r_mean", "mean"))
HEADLINE = "r_mean"
KS = (1, 5, 10)
LR_FLOOR_TOLERANCE = 1.0001
WARNINGS = {
    "lr-floor": "a learned inner learning rate (some phase's lr_img or lr_txt) ended at the floor lr_min: the "
                "distillation drove eta to its clamp",
    "same-students": "the evaluation students are identical (std over students 0 with more than one student): "
                     "they do not sample evaluation noise",
    "loss>1": "the final normalised matching loss is above 1: the synthetic set ends further from the expert "
              "targets than the starting point",
    "still-falling": "the matching loss had not flattened: in some phase the mean over the last quarter of the "
                     f"iterations is more than {100 * TOLERANCE:.0f} % below the quarter before "
                     "(benchmark/convergence.py)",
}


# ----------------------------------------------------------------------------------------------- cell warnings


def lr_at_floor(distilled: dict[str, Any]) -> bool:
    """True when some phase's learned ``lr_img``/``lr_txt`` is ≤ 1.0001 · ``lr_min`` (``meta.params.lr_min``)."""
    lr_min = (distilled.get("meta") or {}).get("params", {}).get("lr_min")
    if lr_min is None:
        return False
    floor = LR_FLOOR_TOLERANCE * float(lr_min)
    return any(p.get(k) is not None and float(p[k]) <= floor for p in distilled.get("phases", [])
               for k in ("lr_img", "lr_txt"))


def normalised_loss(rec: dict[str, Any]) -> float | None:
    """One log record's normalised matching loss: ``loss`` when logged, else the mean of the per-tower ratios
    ``match_loss_img``/``match_loss_txt`` (each ‖θ − θ*‖² / ‖θ_start − θ*‖²: 1 is no progress), else
    ``match_loss``; None when the record has none."""
    if "loss" in rec:
        return float(rec["loss"])
    if "match_loss_img" in rec and "match_loss_txt" in rec:
        return (float(rec["match_loss_img"]) + float(rec["match_loss_txt"])) / 2
    return float(rec["match_loss"]) if "match_loss" in rec else None


def log_iteration(rec: dict[str, Any]) -> int:
    return int(rec["iteration"] if "iteration" in rec else rec["step"])


def cell_warnings(distilled: dict[str, Any] | None, history: Sequence[dict[str, Any]]) -> list[str]:
    """Degeneracy warnings of one distilled cell from its ``distilled.json`` and ``distill_log.jsonl`` records."""
    out = []
    if distilled and lr_at_floor(distilled):
        out.append("lr-floor")
    losses = [v for v in (normalised_loss(r) for r in history) if v is not None]
    if losses and losses[-1] > 1:
        out.append("loss>1")
    if converged(list(history)) is False:
        out.append("still-falling")
    return out


def identical_students(summary: dict[str, Any]) -> bool:
    students = summary.get("students") or []
    return len(students) > 1 and statistics.pstdev(float(s[HEADLINE]) for s in students) == 0


# ------------------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One (method, budget, protocol): an interval per metric, the per-seed cell values, storage, warnings
    (code → number of cells that raised it)."""

    method: str
    budget: int | None
    protocol: str
    seeds: list[int]
    values: dict[str, Interval]
    per_seed: dict[str, dict[int, float]]
    pairs: int | None = None
    bytes: int | None = None
    n_students: int = 0
    warnings: dict[str, int] = field(default_factory=dict)

    @property
    def single_run(self) -> bool:
        return len(self.seeds) == 1


def _row(method: str, budget: int | None, protocol: str, cells: list[dict[str, Any]]) -> Row:
    seeds = [int(c["seed"]) for c in cells]
    per_seed = {k: {s: float(c["summary"][k]["mean"]) for s, c in zip(seeds, cells)} for k, _ in COLUMNS}
    n_students = max(len(c["summary"].get("students") or []) for c in cells)
    if len(cells) > 1:
        values = {k: t_interval(list(per_seed[k].values())) for k, _ in COLUMNS}
    else:  # one run: the spread over its evaluation students, labelled as such
        s = cells[0]["summary"]
        values = {k: spread_interval(s[k]["mean"], s[k]["std"], n_students, f"{n_students} students")
                  for k, _ in COLUMNS}
    warnings: dict[str, int] = {}
    for c in cells:
        for w in c["warnings"] + (["same-students"] if identical_students(c["summary"]) else []):
            warnings[w] = warnings.get(w, 0) + 1
    sizes = [c["bytes"] for c in cells if c["bytes"] is not None]
    return Row(method, budget, protocol, sorted(seeds), values, per_seed, cells[0]["pairs"],
               max(sizes) if sizes else None, n_students, warnings)


def collect_rows(metrics: Iterable[dict[str, Any]]) -> list[Row]:
    """Group cell metrics (as the evaluate stage writes them, optionally with a ``warnings`` list added by
    :func:`cell_warnings`) by (method, budget, protocol), in first-seen method order, strict before paper."""
    groups: dict[tuple[str, int | None, str], list[dict[str, Any]]] = {}
    for m in metrics:
        for protocol, summary in m["protocols"].items():
            groups.setdefault((m["method"], m.get("budget"), protocol), []).append(
                {"seed": m.get("seed", 0), "summary": summary, "warnings": list(m.get("warnings", [])),
                 "pairs": m.get("pairs"), "bytes": m.get("bytes")})
    order = {key: i for i, key in enumerate(groups)}
    keys = sorted(groups, key=lambda k: (k[2] != "strict", k[2], order[k]))
    return [_row(*key, groups[key]) for key in keys]


def load_metrics(paths: list[Path]) -> list[dict[str, Any]]:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} grid cells have no metrics yet (first: {missing[0]}): run "
                                "`mmdd evaluate` for them")
    return [read_json(p) for p in paths]


def reference_paths(directory: Path) -> list[Path]:
    """The reference runs of a dataset: every ``metrics*.json`` in its full-data directory, sorted."""
    return sorted(directory.glob("metrics*.json")) if directory.is_dir() else []


# ------------------------------------------------------------------------------------ comparisons and ranking


def compared_methods(methods: Sequence[str], baseline: str, compare_: Sequence[str], coresets: Sequence[str],
                     study: Sequence[str]) -> list[str]:
    """``compare_`` (those in ``methods``) or, when empty, every method that is neither a coreset, the baseline
    nor part of the study."""
    if compare_:
        return [m for m in compare_ if m in methods]
    return [m for m in methods if m not in coresets and m != baseline and m not in study]


def _headline_values(rows: Sequence[Row], protocol: str) -> dict[tuple[str, int | None], dict[int, float]]:
    return {(r.method, r.budget): r.per_seed[HEADLINE] for r in rows if r.protocol == protocol}


def comparisons(rows: Sequence[Row], compared: Sequence[str], baseline: str | None,
                protocol: str) -> list[tuple[int, Comparison]]:
    """Per budget, on the headline metric: each compared method minus the baseline (a negative difference: worse
    than the baseline), then every pair of compared methods, the better mean first (difference ≥ 0)."""
    values = _headline_values(rows, protocol)
    budgets = sorted({r.budget for r in rows if r.budget is not None})
    out = []
    for b in budgets:
        have = [m for m in compared if (m, b) in values]
        if baseline and (baseline, b) in values:
            out += [(b, compare(values[(m, b)], values[(baseline, b)], m, baseline)) for m in have if m != baseline]
        for x, y in itertools.combinations(have, 2):
            hi, lo = (x, y) if _mean(values[(x, b)]) >= _mean(values[(y, b)]) else (y, x)
            out.append((b, compare(values[(hi, b)], values[(lo, b)], hi, lo)))
    return out


def rankings(rows: Sequence[Row], methods: Sequence[str], protocol: str) -> dict[int, list[Ranked]]:
    """Per budget, the tie-aware ranking (:func:`benchmark.stats.rank`) of ``methods`` on the headline metric."""
    values = _headline_values(rows, protocol)
    budgets = sorted({r.budget for r in rows if r.budget is not None})
    return {b: rank({m: values[(m, b)] for m in methods if (m, b) in values}) for b in budgets}


def _mean(values: dict[int, float]) -> float:
    return statistics.fmean(values.values())


# ----------------------------------------------------------------------------------------------------- styles


@dataclass(frozen=True)
class Style:
    """How one output format writes a table cell: escaping, ``±``, minus, less-than."""

    esc: Callable[[str], str]
    pm: str
    minus: str
    lt: str


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", ">": r"\textgreater{}",
                "<": r"\textless{}", "±": r"$\pm$", "−": "-", "η": r"$\eta$", "≤": r"$\le$", "≥": r"$\ge$",
                "·": r"$\cdot$", "–": "--", "—": "---", "θ": r"$\theta$", "α": r"$\alpha$", "‖": r"$\|$",
                "†": r"$^\dagger$", "²": r"$^2$"}


def tex_escape(text: str) -> str:
    """ASCII LaTeX for a text cell; unknown non-ASCII characters are an error rather than a broken document."""
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))
    bad = sorted({ch for ch in out if not ch.isascii()})
    if bad:
        raise ValueError(f"no LaTeX spelling for {bad} in {text!r}: add it to benchmark.report._TEX_SPECIAL")
    return out


MD = Style(esc=lambda s: str(s).replace("|", "\\|"), pm="±", minus="−", lt="<")
TEX = Style(esc=tex_escape, pm=r"$\pm$", minus="$-$", lt=r"$<$")


def fmt_interval(iv: Interval, style: Style, digits: int = 1) -> str:
    if math.isnan(iv.lo):
        return f"{iv.mean:.{digits}f}"
    return f"{iv.mean:.{digits}f} {style.pm} {iv.half_width:.{digits}f}"


def fmt_signed(x: float, style: Style, digits: int = 2) -> str:
    return (style.minus if x < 0 else "+") + f"{abs(x):.{digits}f}"


def fmt_p(p: float, style: Style) -> str:
    return f"{style.lt} 0.001" if p < 0.001 else f"{p:.3f}"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------------------------- tables


@dataclass
class Table:
    """A table independent of its output format: headers, caption and notes are plain (Unicode) text that each
    renderer escapes; body cells are already written in the target :class:`Style`; ``align`` is one of ``l``,
    ``r``, ``c`` per column."""

    headers: list[str]
    align: str
    body: list[list[str]]
    caption: str
    label: str
    notes: list[str] = field(default_factory=list)
    rule_before: set[int] = field(default_factory=set)  # body rows that a LaTeX \midrule precedes


PublishedTable = dict[tuple[str, str, int | None, str], tuple[float, float | None, str]]


def _published_text(pub: tuple[float, float | None, str] | None, style: Style) -> str:
    if pub is None:
        return ""
    return f" [{pub[0]:.1f}" + (f" {style.pm} {pub[1]:.1f}]" if pub[1] is not None else "]")


def _published_for(row: Row, dataset: str, key: str, published: PublishedTable):
    pub = published.get((dataset, row.method, row.budget, key))
    if pub is None:
        return None
    # published full-data numbers are of a final-epoch student: beside our reference rows whatever the protocol
    return pub if pub[2] == row.protocol or (row.budget is None and pub[2] == "final") else None


def _seeds_text(row: Row, style: Style) -> str:
    if row.single_run:
        return r"1 run$^\dagger$" if style is TEX else f"1 run† ({style.pm} std over {row.n_students} students)"
    return str(len(row.seeds))


def _warnings_text(row: Row, style: Style) -> str:
    return ", ".join(style.esc(f"{w} ({n}/{len(row.seeds)})") for w, n in sorted(row.warnings.items()))


def _pairs_text(row: Row) -> str:
    if row.budget is not None:
        return str(row.budget)
    return f"all ({row.pairs})" if row.pairs else "all"


def results_table(rows: Sequence[Row], dataset: str, protocol: str, style: Style, *, title: str, label: str,
                  published: PublishedTable | None = None) -> Table:
    """One protocol's table: method, pairs, bytes, seeds, the metrics as ``mean ± h``, warnings."""
    published = published or {}
    body = []
    for r in rows:
        cells = [fmt_interval(r.values[k], style) + _published_text(_published_for(r, dataset, k, published), style)
                 for k, _ in COLUMNS]
        body.append([style.esc(r.method), _pairs_text(r), fmt_bytes(r.bytes), _seeds_text(r, style), *cells,
                     _warnings_text(r, style)])
    seeds = sorted({len(r.seeds) for r in rows if not r.single_run})
    caption = (f"{title}: recall (%) on the {dataset} test split; mean ± half-width of the 95% Student-t interval "
               f"over {'/'.join(map(str, seeds)) or 'the'} distillation seeds of the mean over the evaluation students")
    notes = []
    if any(r.single_run for r in rows):
        notes.append("1 run†: a single run (a reference, or a grid with one seed); its ± is the std over its "
                     "evaluation students, not an interval.")
    if any(_published_for(r, dataset, k, published) for r in rows for k, _ in COLUMNS):
        notes.append("[Brackets]: the published number for the cell.")
    notes += [f"{w}: {WARNINGS[w]}." for w in sorted({w for r in rows for w in r.warnings})]
    first_ref = next((i for i, r in enumerate(rows) if r.budget is None), 0)
    return Table(["method", "pairs", "bytes", "seeds", *[h for _, h in COLUMNS], "warnings"],
                 "lrrr" + "c" * len(COLUMNS) + "l", body, caption, label, notes, {first_ref} - {0})


def comparison_table(comps: Sequence[tuple[int, Comparison]], dataset: str, protocol: str, style: Style, *,
                     title: str, label: str) -> Table:
    """Each comparison: pairs, A, B, A − B, its 95 % interval, p, the test used, n."""
    body = [[str(b), style.esc(c.a), style.esc(c.b), fmt_signed(c.diff, style),
             "-" if math.isnan(c.lo) else f"[{fmt_signed(c.lo, style)}, {fmt_signed(c.hi, style)}]",
             fmt_p(c.p, style), c.test, str(c.n)] for b, c in comps]
    caption = (f"{title}: difference in mean recall (A − B, points; against the baseline B, a negative difference "
               f"is worse) on {dataset}, protocol {protocol}, with its 95% t interval and two-sided p-value (paired "
               "t over matched seeds; Welch t where the seeds differ; n: seeds compared). p-values are not adjusted "
               "for multiple comparisons")
    return Table(["pairs", "A", "B", "A − B", "95% CI", "p", "test", "n"], "rllrcrlr", body, caption, label)


def ranking_table(ranks: dict[int, list[Ranked]], rows: Sequence[Row], dataset: str, protocol: str, style: Style,
                  *, title: str, label: str) -> Table:
    """Per budget, each method's tie-group rank, its mean ± h and its comparison with the group's leader."""
    ivs = {(r.method, r.budget): r.values[HEADLINE] for r in rows if r.protocol == protocol}
    body = []
    for b, ranked in ranks.items():
        for x in ranked:
            vs = "group leader" if x.vs_leader is None else (
                f"{fmt_signed(-x.vs_leader.diff, style)} vs {style.esc(x.leader)}, p = {fmt_p(x.vs_leader.p, style)}")
            body.append([str(b), str(x.rank), style.esc(x.method), fmt_interval(ivs[(x.method, b)], style), vs])
    caption = (f"{title}: ranking by mean recall on {dataset}, protocol {protocol}. Going down the ranking, a "
               f"method joins the current tie group when it is not significantly below the group's best (p ≥ "
               f"{ALPHA}, paired t over matched seeds), else it starts a new group; members share the rank")
    return Table(["pairs", "rank", "method", "mean ± h", "vs group leader"], "rrlcl", body, caption, label)


def to_markdown(table: Table) -> str:
    """A github table, its caption in italics and its notes below."""
    colalign = [{"l": "left", "r": "right", "c": "center"}[a] for a in table.align]
    text = tabulate(table.body, headers=table.headers, tablefmt="github", disable_numparse=True, colalign=colalign)
    return "\n\n".join([text, f"*{table.caption}.*", *table.notes])


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``), ASCII only."""
    size = r"\footnotesize" if len(table.headers) > 9 else r"\small"  # the results tables: 12 columns
    lines = [r"\begin{table}[tbp]", r"\centering", size, r"\setlength{\tabcolsep}{3pt}",
             rf"\caption{{{tex_escape(table.caption)}.}}", rf"\label{{{table.label}}}",
             rf"\begin{{tabular}}{{{table.align}}}", r"\toprule",
             " & ".join(tex_escape(h) for h in table.headers) + r" \\", r"\midrule",
             *[(r"\midrule" + "\n" if i in table.rule_before else "") + " & ".join(cells) + r" \\"
               for i, cells in enumerate(table.body)], r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        lines += [r"\par\smallskip", r"\parbox{\linewidth}{\footnotesize " + tex_escape(" ".join(table.notes)) + "}"]
    return "\n".join(lines + [r"\end{table}"])


def rows_csv(rows: Sequence[Row], section: str) -> list[dict[str, Any]]:
    """Tidy records: one per row, each metric's mean, interval bounds (t over seeds, or ± std for single runs)."""
    out = []
    for r in rows:
        rec = {"section": section, "method": r.method, "pairs": "" if r.budget is None else r.budget,
               "protocol": r.protocol, "bytes": "" if r.bytes is None else r.bytes, "n_seeds": len(r.seeds),
               "interval": r.values[HEADLINE].kind, "warnings": ";".join(sorted(r.warnings))}
        for k, _ in COLUMNS:
            iv = r.values[k]
            rec |= {f"{k}_mean": f"{iv.mean:.4f}", f"{k}_lo": _num(iv.lo), f"{k}_hi": _num(iv.hi)}
        out.append(rec)
    return out


def comparisons_csv(comps: Sequence[tuple[int, Comparison]], section: str) -> list[dict[str, Any]]:
    return [{"section": section, "pairs": b, "a": c.a, "b": c.b, "diff": f"{c.diff:.4f}", "ci_lo": _num(c.lo),
             "ci_hi": _num(c.hi), "p": f"{c.p:.6g}", "test": c.test, "n": c.n} for b, c in comps]


def ranking_csv(ranks: dict[int, list[Ranked]], section: str) -> list[dict[str, Any]]:
    return [{"section": section, "pairs": b, "rank": x.rank, "group": x.group, "method": x.method,
             "mean": f"{x.mean:.4f}", "leader": x.leader,
             "p_vs_leader": "" if x.vs_leader is None else f"{x.vs_leader.p:.6g}"} for b, xs in ranks.items()
            for x in xs]


def _num(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.4f}"


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if records:
        w = csv.DictWriter(buf, fieldnames=list(records[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(records)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ published numbers

PUBLISHED_CSV = Path(__file__).with_name("published") / "published_results.csv"


def load_published(path: Path = PUBLISHED_CSV) -> PublishedTable:
    """(dataset, method, pairs, metric) -> (value, std or None, protocol) from the published-results data file."""
    out = {}
    with path.open() as f:
        for r in csv.DictReader(f):
            pairs = int(r["pairs"]) if r["pairs"] else None
            out[(r["dataset"], r["method"], pairs, r["metric"])] = (
                float(r["value"]), float(r["std"]) if r["std"] else None, r["protocol"])
    return out


def render_with_published(rows: Sequence[Row], dataset: str, protocol: str = "paper",
                          published: PublishedTable | None = None) -> str:
    """One protocol's markdown table, with the published value in brackets where the papers report the cell."""
    published = load_published() if published is None else published
    return to_markdown(results_table([r for r in rows if r.protocol == protocol], dataset, protocol, MD,
                                     title=f"{dataset}, {protocol}", label=f"tab:{dataset}-{protocol}",
                                     published=published))


# ------------------------------------------------------------------------------------------ a dataset's report


@dataclass
class DatasetReport:
    """Everything reported for one dataset. ``protocol`` is the one comparisons and rankings use (``strict``
    when evaluated, the protocol to quote); ``rows`` the main table (grid methods outside the study),
    ``references`` the single-run reference rows, ``study_rows`` the phased-teacher study."""

    dataset: str
    protocol: str
    rows: list[Row]
    references: list[Row]
    study_rows: list[Row]
    comparisons: list[tuple[int, Comparison]]
    ranking: dict[int, list[Ranked]]
    study_comparisons: list[tuple[int, Comparison]]
    study_ranking: dict[int, list[Ranked]]
    notes: list[str] = field(default_factory=list)

    @property
    def protocols(self) -> list[str]:
        return list(dict.fromkeys(r.protocol for r in self.rows + self.references + self.study_rows))


def build_dataset_report(dataset: str, metrics: Iterable[dict[str, Any]], references: Iterable[dict[str, Any]],
                         methods: Sequence[str], settings: Any) -> DatasetReport:
    """Rows, comparisons and rankings of one dataset. ``methods``: the grid's methods in order; ``settings``: a
    :class:`benchmark.config.ReportConfig` (baseline, compare, coresets, study: variants appear only in the study,
    base methods listed there in both)."""
    all_rows = collect_rows(metrics)
    study = [m for m in settings.study if m in methods]
    # a variant (<method>__<variant>) exists for the study only; a base method listed in the study (e.g. the
    # PT + ST configuration itself) also stays in the main table
    only_study = [m for m in study if VARIANT_SEP in m]
    main_methods = [m for m in methods if m not in only_study]
    rows = [r for r in all_rows if r.method not in only_study]
    study_rows = [r for r in all_rows if r.method in study]
    protocols = list(dict.fromkeys(r.protocol for r in all_rows))
    protocol = "strict" if "strict" in protocols or not protocols else protocols[0]
    baseline = settings.baseline if settings.baseline in main_methods else None
    compared = compared_methods(main_methods, settings.baseline, settings.compare, settings.coresets, only_study)
    return DatasetReport(
        dataset, protocol, rows, collect_rows(references), study_rows,
        comparisons(rows, compared, baseline, protocol), rankings(rows, main_methods, protocol),
        comparisons(study_rows, study, None, protocol), rankings(study_rows, study, protocol),
        _setting_notes(methods, settings))


def _setting_notes(methods: Sequence[str], settings: Any) -> list[str]:
    notes = []
    if settings.baseline not in methods:
        notes.append(f"The baseline `{settings.baseline}` (report.baseline) is not in the grid: no comparison "
                     "against it.")
    missing = [m for m in [*settings.compare, *settings.study] if m not in methods]
    if missing:
        notes.append(f"Not in the grid, so not reported: {', '.join(f'`{m}`' for m in missing)} (report.compare / "
                     "report.study name methods of grid.methods).")
    return notes


def _protocol_rows(rep: DatasetReport, protocol: str) -> list[Row]:
    return [r for r in rep.rows + rep.references if r.protocol == protocol]


def dataset_tables(rep: DatasetReport, style: Style, published: PublishedTable) -> list[tuple[str, Table]]:
    """(section heading, table) in page order: one table per protocol, the comparisons, the ranking, then the
    phased-teacher study (its table, comparisons and ranking)."""
    ds, p = rep.dataset, rep.protocol
    out = [(f"{proto.capitalize()} protocol",
            results_table(_protocol_rows(rep, proto), ds, proto, style, title=f"{ds}, {proto} protocol",
                          label=f"tab:{ds}-{proto}", published=published)) for proto in rep.protocols
           if _protocol_rows(rep, proto)]
    if rep.comparisons:
        out.append(("Paired comparisons", comparison_table(rep.comparisons, ds, p, style,
                                                           title=f"{ds}, comparisons", label=f"tab:{ds}-compare")))
    if any(rep.ranking.values()):
        out.append(("Ranking", ranking_table(rep.ranking, rep.rows, ds, p, style, title=f"{ds}, ranking",
                                             label=f"tab:{ds}-ranking")))
    if rep.study_rows:
        rows = [r for r in rep.study_rows if r.protocol == p]
        out.append(("Phased-teacher study", results_table(rows, ds, p, style, title=f"{ds}, phased-teacher study",
                                                          label=f"tab:{ds}-study")))
        if rep.study_comparisons:
            out.append(("Phased-teacher study: paired comparisons", comparison_table(
                rep.study_comparisons, ds, p, style, title=f"{ds}, phased-teacher study comparisons",
                label=f"tab:{ds}-study-compare")))
        out.append(("Phased-teacher study: ranking", ranking_table(
            rep.study_ranking, rep.study_rows, ds, p, style, title=f"{ds}, phased-teacher study ranking",
            label=f"tab:{ds}-study-ranking")))
    return out


def dataset_markdown(rep: DatasetReport, published: PublishedTable, level: int = 3) -> str:
    parts = [f"{'#' * level} {head}\n\n{to_markdown(t)}" for head, t in dataset_tables(rep, MD, published)]
    return "\n\n".join(parts + rep.notes)


def dataset_latex(rep: DatasetReport, published: PublishedTable) -> str:
    head = (f"% {rep.dataset}: tables written by the report stage (mmdd report). Needs \\usepackage{{booktabs}}.\n")
    return head + "\n\n".join(to_latex(t) for _, t in dataset_tables(rep, TEX, published)) + "\n"


def write_dataset_tables(rep: DatasetReport, out_dir: Path, published: PublishedTable) -> list[Path]:
    """``<ds>.md``, ``<ds>.tex``, ``<ds>.csv`` (every row), ``<ds>.comparisons.csv``, ``<ds>.ranking.csv``."""
    ds = rep.dataset
    texts = {
        f"{ds}.md": dataset_markdown(rep, published) + "\n",
        f"{ds}.tex": dataset_latex(rep, published),
        f"{ds}.csv": to_csv(rows_csv(rep.rows, "main") + rows_csv(rep.references, "reference")
                            + rows_csv(rep.study_rows, "study")),
        f"{ds}.comparisons.csv": to_csv(comparisons_csv(rep.comparisons, "main")
                                        + comparisons_csv(rep.study_comparisons, "study")),
        f"{ds}.ranking.csv": to_csv(ranking_csv(rep.ranking, "main") + ranking_csv(rep.study_ranking, "study")),
    }
    out = []
    for name, text in texts.items():
        with atomic_path(out_dir / name) as tmp:
            tmp.write_text(text)
        out.append(out_dir / name)
    return out


def summary_metrics(rows: Iterable[Row]) -> dict[str, dict[str, float]]:
    """``{"<method>/b<pairs>/<protocol>": {"r_mean": mean, "r_mean_std": std over seeds, "r_mean_ci_lo": ...,
    "r_mean_ci_hi": ..., ..., "n": seeds}}`` for ``dvc metrics show``. A single run has n = 1, no interval, and
    ``_std`` is its std over evaluation students."""
    out = {}
    for r in rows:
        rec: dict[str, float] = {"n": len(r.seeds)}
        for k, iv in r.values.items():
            rec[k] = round(iv.mean, 3)
            if r.single_run:
                rec[f"{k}_std"] = round(iv.half_width, 3)
            else:
                rec[f"{k}_std"] = round(statistics.stdev(r.per_seed[k].values()), 3)
                rec |= {f"{k}_ci_lo": round(iv.lo, 3), f"{k}_ci_hi": round(iv.hi, 3)}
        out[f"{r.method}/b{'all' if r.budget is None else r.budget}/{r.protocol}"] = rec
    return out


# ------------------------------------------------------------------------------------------ chance and curves


def chance_recall(n_images: int, captions_per_image: int) -> float:
    """Expected r_mean (%) of random scores: IR@K = K/N; TR@K = 1 − C(cN − c, K)/C(cN, K) (some of an image's
    c captions among the first K of cN)."""
    n, c = n_images, captions_per_image
    ir = [min(k, n) / n for k in KS]
    tr = [1 - math.comb(c * n - c, k) / math.comb(c * n, k) for k in KS]
    return 100 * statistics.fmean(ir + tr)


@dataclass
class Curve:
    """A distillation curve over seeds: each seed's smoothed normalised loss, their mean and range per iteration,
    and the iterations where a new phase starts."""

    iterations: list[int]
    mean: list[float]
    lo: list[float]
    hi: list[float]
    seeds: int
    phase_starts: list[int]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average; the window shrinks at the ends (no padding)."""
    half = window // 2
    return [statistics.fmean(values[max(0, i - half):i + half + 1]) for i in range(len(values))]


def seed_curve(histories: Sequence[Sequence[dict[str, Any]]], window: int | None = None) -> Curve | None:
    """Smooth each seed's normalised matching loss (window: a tenth of the run, odd), then take the mean and the
    range over seeds at the iterations every seed logged; None when no seed logged a loss."""
    per_seed = []
    for hist in histories:
        pts = [(log_iteration(r), normalised_loss(r)) for r in hist]
        pts = [(i, v) for i, v in pts if v is not None]
        if pts:
            w = window or max(1, len(pts) // 10) | 1
            per_seed.append(dict(zip([i for i, _ in pts], smooth([v for _, v in pts], w))))
    if not per_seed:
        return None
    iters = sorted(set.intersection(*(set(s) for s in per_seed)))
    cols = [[s[i] for s in per_seed] for i in iters]
    return Curve(iters, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols],
                 len(per_seed), phase_starts(histories))


def phase_starts(histories: Sequence[Sequence[dict[str, Any]]]) -> list[int]:
    """Iterations at which a log's ``phase`` field changes (the first iteration of every phase after the first)."""
    starts = set()
    for hist in histories:
        prev = None
        for rec in hist:
            if "phase" in rec:
                if prev is not None and rec["phase"] != prev:
                    starts.add(log_iteration(rec))
                prev = rec["phase"]
    return sorted(starts)


def budget_series(rows: Iterable[Row], protocol: str) -> dict[str, list[tuple[int, Interval]]]:
    """method -> [(budget, interval of the headline metric)] of the grid rows of one protocol."""
    out: dict[str, list[tuple[int, Interval]]] = {}
    for r in rows:
        if r.protocol == protocol and r.budget is not None:
            out.setdefault(r.method, []).append((r.budget, r.values[HEADLINE]))
    return {m: sorted(v, key=lambda x: x[0]) for m, v in out.items()}


# ------------------------------------------------------------------------------------------------ the pages


@dataclass
class DatasetSection:
    """What the preset's page shows for one dataset: its tables (markdown), figures and synthetic-set grids."""

    dataset: str
    markdown: str
    plots: list[Path]
    grids: list[tuple[str, Path]]


ROLE_NOTES = {
    "smoke": "**This is a smoke run: it checks that every stage, method and study variant runs. It ranks nothing** "
             "(few seeds, a few distillation iterations, tiny data); do not read its numbers as results.",
    "paper": "The published settings (docs/methods.md); compare with the published numbers in [brackets].",
    "ranking": "Sized to rank methods: independent seeds (distillation and evaluation students), intervals over "
               "seeds, paired comparisons (docs/protocols.md#seeds-replicates-and-intervals).",
}


def preset_page(preset: str, n_seeds: int, n_students: int, select: str, sections: Sequence[DatasetSection],
                root: Path, role: str = "ranking") -> str:
    """The text of ``results/<preset>.md``; links only files under ``root`` that the report writes (tracked)."""
    lines = [f"# Results: `{preset}` preset", "", ROLE_NOTES.get(role, ""), "",
             "Generated by the `report` stage (`mmdd report`); do not edit. A cell's value is the mean over its "
             f"{n_students} evaluation students; each value below is the mean over {n_seeds} distillation seeds ± "
             "the half-width of the 95 % Student-t interval over those seeds (docs/protocols.md#statistics). "
             "Single runs (references such as full data) show ± the std over their evaluation students and say "
             f"so. Protocol `strict` (select `{select}`) never looks at test before the final read; `paper` is the "
             "published best-of-test-evaluations protocol, shown only to compare with the papers, whose numbers "
             "(where they have the cell) are in [brackets]. Comparisons and rankings use the strict protocol and "
             f"the mean recall. The environment that computed them: [environment/{preset}.json]"
             f"(environment/{preset}.json).", ""]
    for sec in sections:
        lines += [f"## {sec.dataset}", "", sec.markdown, "", "### Figures", "",
                  *[f"![{p.stem}]({_rel(p, root)})\n" for p in sec.plots]]
        grids = [(m, g) for m, g in sec.grids if g.exists()]
        if grids:
            lines += ["Synthetic images at the largest budget (seed 0): " + ", ".join(
                f"[{m}]({_rel(g, root)})" for m, g in grids), ""]
        lines += [f"Tables: [markdown](tables/{preset}/{sec.dataset}.md), [CSV](tables/{preset}/{sec.dataset}.csv), "
                  f"[LaTeX](tables/{preset}/{sec.dataset}.tex), [comparisons CSV](tables/{preset}/"
                  f"{sec.dataset}.comparisons.csv), [ranking CSV](tables/{preset}/{sec.dataset}.ranking.csv)", ""]
    return "\n".join(lines).rstrip() + "\n"


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def results_index(root: Path) -> str:
    """The text of ``results/README.md``: one link per preset page (``results/<preset>.md``) found under ``root``."""
    pages = sorted(p for p in root.glob("*.md") if p.name != "README.md")
    lines = ["# Results", "", "One page per preset, each written by that preset's `report` stage (`mmdd report`); "
             "running one preset never rewrites another's page.", ""]
    lines += [f"- [`{p.stem}`]({p.name})" for p in pages] or ["No preset has been reported yet."]
    return "\n".join(lines) + "\n"
