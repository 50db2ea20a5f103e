"""The report: rows with t intervals over seeds, separate protocol tables, degeneracy warnings, paired comparisons
and rankings, the phased-teacher study, LaTeX that compiles, and a whole report rendered from a fake results tree."""

import csv
import io
import json
import re
import shutil
import statistics
import subprocess

import pytest
import torch
from scipy import stats as sps

from benchmark import report as rp
from benchmark.config import ReportConfig
from benchmark.stats import t_interval

KEYS = [k for k, _ in rp.COLUMNS]


def metrics(method, budget, seed, value, students=(-0.2, 0.2), protocols=("strict", "paper"), pairs=None,
            nbytes=1000):
    """A cell's metrics.json as the evaluate stage writes it: every metric of student i is value + students[i]."""
    per_student = [{k: value + d for k in KEYS} | {"phase": 0, "epoch": -1} for d in students]
    summary = {k: {"mean": statistics.fmean(s[k] for s in per_student),
                   "std": statistics.stdev(s[k] for s in per_student) if len(per_student) > 1 else 0.0}
               for k in KEYS}
    rec = {"method": method, "dataset": "shapes", "seed": seed, "pairs": pairs or budget, "bytes": nbytes,
           "select": "final", "protocols": {p: dict(summary, students=per_student) for p in protocols}}
    return rec if budget is None else rec | {"budget": budget}


def grid(values, budget=10):
    """``{method: [value per seed]}`` -> metrics dicts over seeds 0..n-1."""
    return [metrics(m, budget, s, v) for m, vs in values.items() for s, v in enumerate(vs)]


def settings(**kw):
    return ReportConfig(**kw)


def test_rows_carry_t_intervals_over_seeds_and_single_runs_their_std_over_students():
    rows = rp.collect_rows(grid({"random": [1.0, 2.0, 4.0]}) + [metrics("full-data", None, 0, 50.0, pairs=500)])
    seeds_row = next(r for r in rows if r.method == "random" and r.protocol == "strict")
    iv = seeds_row.values["r_mean"]
    expected = t_interval([1.0, 2.0, 4.0])
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((expected.mean, expected.lo, expected.hi))
    assert seeds_row.per_seed["r_mean"] == {0: 1.0, 1: 2.0, 2: 4.0} and not seeds_row.single_run
    ref = next(r for r in rows if r.method == "full-data")
    assert ref.single_run and ref.values["r_mean"].half_width == pytest.approx(statistics.stdev([49.8, 50.2]))
    md = rp.to_markdown(rp.results_table([seeds_row, ref], "shapes", "strict", rp.MD, title="t", label="l"))
    line = next(x for x in md.splitlines() if x.startswith("| full-data"))
    assert "1 run† (± std over 2 students)" in line and "all (500)" in line
    assert "its ± is the std over its evaluation students, not an interval" in md
    assert f"2.3 ± {expected.half_width:.1f}" in md


def test_strict_and_paper_are_separate_tables_with_bytes_seeds_and_published_numbers():
    published = {("shapes", "lors", 10, "ir1"): (8.3, 0.2, "paper"),
                 ("shapes", "lors", 10, "ir5"): (9.9, None, "paper")}
    rep = rp.build_dataset_report("shapes", grid({"random": [1, 2], "lors": [3, 4]}), [], ["random", "lors"],
                                  settings())
    md = rp.dataset_markdown(rep, published)
    strict, paper = md.split("### Paper protocol")
    strict = strict.split("### Strict protocol")[1].split("###")[0]
    header = [h.strip() for h in strict.strip().splitlines()[0].strip("|").split("|")]
    assert header[:4] == ["method", "pairs", "bytes", "seeds"] and header[-1] == "warnings"
    assert len([x for x in strict.splitlines() if x.startswith("| lors")]) == 1
    assert len([x for x in paper.split("###")[0].splitlines() if x.startswith("| lors")]) == 1
    assert "[8.3 ± 0.2]" in paper and "[9.9]" in paper and "[8.3" not in strict  # published: paper protocol only
    assert "1.00 kB" in strict


def test_warnings_flag_lr_at_floor_identical_students_and_matching_loss_above_one():
    floor = {"meta": {"params": {"lr_min": 1e-6}}, "phases": [{"lr_img": 0.1, "lr_txt": 0.1},
                                                               {"lr_img": 0.05, "lr_txt": 1.00005e-6}]}
    healthy = {"meta": {"params": {"lr_min": 1e-6}}, "phases": [{"lr_img": 0.1, "lr_txt": 2e-6}]}
    diverging = [{"step": 1, "match_loss_img": 1.0, "match_loss_txt": 1.0},
                 {"step": 2, "match_loss_img": 1.3, "match_loss_txt": 0.9}]  # mean of the towers 1.1
    converging = [{"iteration": 1, "loss": 1.0}, {"iteration": 2, "loss": 0.7}]
    assert rp.cell_warnings(floor, converging) == ["lr-floor"]
    assert rp.cell_warnings(healthy, diverging) == ["loss>1"]
    assert rp.cell_warnings(healthy, converging) == [] and rp.cell_warnings(None, []) == []
    cells = [metrics("mtt-vl", 10, 0, 3.0) | {"warnings": rp.cell_warnings(floor, converging)},
             metrics("mtt-vl", 10, 1, 3.0, students=(0.0, 0.0)) | {"warnings": []},
             metrics("mtt-vl", 10, 2, 3.0) | {"warnings": rp.cell_warnings(healthy, diverging)}]
    row = next(r for r in rp.collect_rows(cells) if r.protocol == "strict")
    assert row.warnings == {"lr-floor": 1, "same-students": 1, "loss>1": 1}
    md = rp.to_markdown(rp.results_table([row], "shapes", "strict", rp.MD, title="t", label="l"))
    assert "loss>1 (1/3), lr-floor (1/3), same-students (1/3)" in md
    assert all(rp.WARNINGS[w] in md for w in row.warnings)  # each code explained under the table
    one_student = rp.collect_rows([metrics("x", 10, 0, 1.0, students=(0.0,))])[0]
    assert one_student.warnings == {}  # a single student cannot be "identical students"


def test_comparisons_against_the_baseline_and_between_compared_methods_are_paired_by_seed():
    vals = {"random": [1.0, 1.2, 0.9, 1.1], "herding": [1.1, 1.0, 1.3, 1.2], "tesla-vl": [3.0, 3.9, 2.8, 3.4],
            "ptm-st": [3.3, 3.7, 3.5, 3.9]}
    rep = rp.build_dataset_report("shapes", grid(vals), [], list(vals), settings())
    pairs = [(c.a, c.b) for _, c in rep.comparisons]
    assert pairs == [("tesla-vl", "random"), ("ptm-st", "random"), ("ptm-st", "tesla-vl")]  # herding: a coreset
    c = rep.comparisons[2][1]
    res = sps.ttest_rel(vals["ptm-st"], vals["tesla-vl"])
    assert c.test == "paired t" and c.n == 4 and c.p == pytest.approx(res.pvalue)
    assert c.diff == pytest.approx(statistics.fmean(vals["ptm-st"]) - statistics.fmean(vals["tesla-vl"]))
    md = rp.to_markdown(rp.comparison_table(rep.comparisons, "shapes", "strict", rp.MD, title="t", label="l"))
    assert "| paired t |" in md and "not adjusted for multiple comparisons" in md
    explicit = rp.build_dataset_report("shapes", grid(vals), [], list(vals), settings(compare=["herding"]))
    assert [(c.a, c.b) for _, c in explicit.comparisons] == [("herding", "random")]
    worse = rp.build_dataset_report("shapes", grid({"random": [2.0, 2.5], "bad": [1.0, 1.2]}), [],
                                    ["random", "bad"], settings())
    assert [(c.a, c.b, c.diff < 0) for _, c in worse.comparisons] == [("bad", "random", True)]  # method − baseline


def test_unmatched_seeds_are_compared_with_welch_and_say_so():
    cells = grid({"random": [1.0, 1.4, 1.1]}) + [metrics("lors", 10, s, v) for s, v in [(0, 3.0), (1, 3.5), (5, 2.9)]]
    rep = rp.build_dataset_report("shapes", cells, [], ["random", "lors"], settings())
    ((_, c),) = rep.comparisons
    assert c.test == "Welch t" and c.n == 6
    assert c.p == pytest.approx(sps.ttest_ind([3.0, 3.5, 2.9], [1.0, 1.4, 1.1], equal_var=False).pvalue)


def test_ranking_table_groups_ties_with_the_leader_and_shares_their_rank():
    vals = {"a": [5.0, 6.0, 5.5], "b": [4.9, 6.2, 5.2], "c": [1.0, 1.5, 1.2]}
    rep = rp.build_dataset_report("shapes", grid(vals), [], list(vals), settings(baseline="c"))
    ranked = {x.method: x for x in rep.ranking[10]}
    assert (ranked["a"].rank, ranked["b"].rank, ranked["c"].rank) == (1, 1, 3)
    md = rp.to_markdown(rp.ranking_table(rep.ranking, rep.rows, "shapes", "strict", rp.MD, title="t", label="l"))
    assert re.search(r"\| +10 \| +1 \| b +\| .*vs a, p = ", md) and "group leader" in md


def test_study_variants_have_their_own_section_and_base_methods_stay_in_the_main_table():
    vals = {"random": [1.0, 1.1], "ptm-st": [3.0, 3.2], "ptm-st__pt-only": [2.0, 2.5], "ptm-st__st-only": [2.6, 2.4]}
    study = ["ptm-st", "ptm-st__pt-only", "ptm-st__st-only", "ptm-st__not-run"]
    rep = rp.build_dataset_report("shapes", grid(vals), [], list(vals), settings(study=study))
    assert {r.method for r in rep.rows} == {"random", "ptm-st"}
    assert {r.method for r in rep.study_rows} == {"ptm-st", "ptm-st__pt-only", "ptm-st__st-only"}
    assert {(c.a, c.b) for _, c in rep.study_comparisons} == {
        ("ptm-st", "ptm-st__st-only"), ("ptm-st", "ptm-st__pt-only"), ("ptm-st__st-only", "ptm-st__pt-only")}
    assert [(c.a, c.b) for _, c in rep.comparisons] == [("ptm-st", "random")]  # variants are not compared here
    md = rp.dataset_markdown(rep, {})
    main, study_md = md.split("### Phased-teacher study", 1)
    assert "pt-only" not in main and "| ptm-st__pt-only" in study_md and "| ptm-st " in study_md
    assert "`ptm-st__not-run`" in md  # a named study method missing from the grid is reported as such


def test_latex_is_ascii_booktabs_with_caption_label_and_pm():
    rep = rp.build_dataset_report("shapes", grid({"random": [1, 2], "my_method": [3, 5]}),
                                  [metrics("full-data", None, 0, 50.0, pairs=500)], ["random", "my_method"],
                                  settings())
    tex = rp.dataset_latex(rep, {})
    assert tex.isascii()
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 4  # strict, paper, comparisons, ranking
    assert tex.count(r"\toprule") == tex.count(r"\bottomrule") == 4 and r"\midrule" in tex
    assert tex.count(r"\caption{") == 4 and r"\label{tab:shapes-strict}" in tex and r"$\pm$" in tex
    assert r"my\_method" in tex and r"95\%" in tex and r"1 run$^\dagger$" in tex
    assert r"\begin{tabular}{lrrrcccccccl}" in tex
    with pytest.raises(ValueError, match="no LaTeX spelling"):
        rp.tex_escape("ü")


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="no TeX engine (apt-get install texlive-latex-base "
                                                             "texlive-latex-recommended)")
def test_latex_tables_compile_with_pdflatex(tmp_path):
    rep = rp.build_dataset_report("shapes", grid({"random": [1, 2], "my_method": [3, 5]}),
                                  [metrics("full-data", None, 0, 50.0, pairs=500)], ["random", "my_method"],
                                  settings())
    (tmp_path / "tables.tex").write_text(rp.dataset_latex(rep, {}))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage[margin=1.5cm]{geometry}\n"
                                      "\\usepackage{booktabs}\n\\begin{document}\n\\input{tables}\n\\end{document}\n")
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert (tmp_path / "doc.pdf").stat().st_size > 0 and "Overfull" not in log


def test_csv_and_summary_carry_interval_bounds_and_n():
    rep = rp.build_dataset_report("shapes", grid({"random": [1.0, 2.0, 4.0]}),
                                  [metrics("full-data", None, 0, 50.0, pairs=500)], ["random"], settings())
    text = rp.to_csv(rp.rows_csv(rep.rows, "main") + rp.rows_csv(rep.references, "reference"))
    recs = list(csv.DictReader(io.StringIO(text)))
    strict = next(r for r in recs if r["method"] == "random" and r["protocol"] == "strict")
    iv = t_interval([1.0, 2.0, 4.0])
    assert float(strict["r_mean_lo"]) == pytest.approx(iv.lo, abs=1e-4) and strict["n_seeds"] == "3"
    assert strict["bytes"] == "1000" and "r_mean_mean" in recs[0]
    summary = rp.summary_metrics(rep.rows + rep.references)
    s = summary["random/b10/strict"]
    assert s["n"] == 3 and s["r_mean_ci_lo"] == round(iv.lo, 3) and s["r_mean_ci_hi"] == round(iv.hi, 3)
    assert s["r_mean_std"] == round(statistics.stdev([1.0, 2.0, 4.0]), 3)
    ref = summary["full-data/ball/strict"]
    assert ref["n"] == 1 and "r_mean_ci_lo" not in ref and ref["r_mean_std"] == pytest.approx(0.283, abs=1e-3)


def test_chance_level_and_curves_over_seeds_with_phase_boundaries():
    assert rp.chance_recall(500, 5) == pytest.approx(1.064, abs=1e-3)  # IR@K = K/500; TR@K a touch below
    assert rp.chance_recall(10, 1) == pytest.approx(100 * (0.1 + 0.5 + 1.0) / 3)
    hist = [[{"step": i, "loss": 1.0 - 0.01 * i * (s + 1), "phase": 0 if i <= 10 else 1} for i in range(1, 21)]
            for s in range(3)]
    c = rp.seed_curve(hist, window=1)
    assert c.iterations == list(range(1, 21)) and c.seeds == 3 and c.phase_starts == [11]
    assert c.mean[0] == pytest.approx(1 - 0.02) and c.lo[0] == pytest.approx(0.97) and c.hi[0] == pytest.approx(0.99)
    assert rp.smooth([0, 3, 6, 9], 3) == [1.5, 3, 6, 7.5]
    assert rp.seed_curve([[{"step": 1, "sec_per_iter": 0.1}]]) is None


def _fake_tree(root, methods, budgets, seeds):
    """results/cells/<preset>/shapes/... with metrics.json, a real distilled set and a distillation log per cell,
    plus a full-data reference and a second reference run."""
    from benchmark.distilled import DistilledSet, Phase

    g = torch.Generator().manual_seed(0)
    for mi, m in enumerate(methods):
        for b in budgets:
            for s in seeds:
                d = root / "cells" / "tiny" / "shapes" / m / f"b{b}" / f"s{s}"
                d.mkdir(parents=True)
                rec = metrics(m, b, s, 2.0 + mi + 0.01 * b + 0.3 * s, nbytes=b * 3 * 16 * 16 * 4)
                (d / "metrics.json").write_text(json.dumps(rec))
                phases = [Phase(torch.randn(b // 2, 3, 16, 16, generator=g), torch.randn(b // 2, 384, generator=g),
                                0.1, 1e-6 if m == "tesla-vl" and s == 0 else 0.1) for _ in range(2)]
                DistilledSet(phases, {"params": {"lr_min": 1e-6}}, "ce").save(d / "distilled")
                log = [{"step": i, "match_loss_img": 1 - 0.02 * i, "match_loss_txt": 1 - 0.01 * i,
                        "phase": float(i > 5)} for i in range(1, 11)] if m != "random" else []
                (d / "distill_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    full = root / "cells" / "tiny" / "shapes" / "full-data"
    full.mkdir(parents=True)
    (full / "metrics.json").write_text(json.dumps(metrics("full-data", None, 0, 40.0, protocols=("strict",),
                                                          pairs=120)))
    (full / "metrics_expert_final.json").write_text(json.dumps(metrics("expert@final", None, 0, 38.0,
                                                                       protocols=("strict",), pairs=120)))


def test_whole_report_from_a_fake_results_tree(tmp_path):
    from PIL import Image

    from benchmark.params import resolve
    from benchmark.paths import Layout
    from benchmark.stages.context import StageContext
    from benchmark.stages.report import report

    methods, budgets, seeds = ["random", "herding", "tesla-vl", "ptm-st"], [10, 20], [0, 1, 2]
    cfg = resolve("tiny", ["grid.methods=[random,herding,tesla-vl,ptm-st]", "grid.budgets=[10,20]",
                           "grid.seeds=[0,1,2]", "report.study=[ptm-st]"])
    results = tmp_path / "results"
    _fake_tree(results, methods, budgets, seeds)
    rendered = report(StageContext(cfg, Layout(tmp_path / "data", results), progress=False))

    md = rendered["shapes"]
    for head in ("### Strict protocol", "### Paper protocol", "### Paired comparisons", "### Ranking",
                 "### Phased-teacher study"):
        assert head in md
    assert "tesla-vl" in md and "lr-floor (1/3)" in md and "| expert@final" in md
    tables = results / "tables" / "tiny"
    for name in ("shapes.md", "shapes.csv", "shapes.tex", "shapes.comparisons.csv", "shapes.ranking.csv"):
        assert (tables / name).stat().st_size > 0, name
    assert (tables / "shapes.tex").read_text().isascii()
    plots = results / "plots" / "tiny"
    for name in ("shapes_recall_vs_budget.png", "shapes_seeds.png", "shapes_study_seeds.png",
                 "shapes_distill_curves.png"):
        assert Image.open(plots / name).size[0] > 400, name
    grid_png = Image.open(plots / "grids" / "shapes_ptm-st_b20_s0.png")
    assert grid_png.size[0] >= 64 * 5  # 20 images of 16 px: a 5-wide grid of tiles upscaled to >= 64 px
    summary = json.loads((results / "metrics" / "tiny.json").read_text())["shapes"]
    assert summary["tesla-vl/b20/strict"]["n"] == 3 and "r_mean_ci_hi" in summary["tesla-vl/b20/strict"]
    page = (results / "tiny.md").read_text()
    links = re.findall(r"\]\(([^)]+)\)", page)
    assert links and all((results / link).exists() for link in links), links
    assert not any("cells/" in link for link in links)  # only tracked files: nothing from results/cells
    assert "grids/shapes_ptm-st_b20_s0.png" in page
    index = (results / "README.md").read_text()
    assert "[`tiny`](tiny.md)" in index
    # another preset's report adds its own page and keeps this one
    cfg.preset = "other"
    (results / "cells" / "tiny").rename(results / "cells" / "other")
    report(StageContext(cfg, Layout(tmp_path / "data", results), progress=False))
    assert (results / "tiny.md").read_text() == page
    index = (results / "README.md").read_text()
    assert "[`tiny`](tiny.md)" in index and "[`other`](other.md)" in index
