"""`shapes` is hard enough: chance, small coresets and a full-data student are far apart (issue: foundation)."""

import pytest

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.paths import Layout
from benchmark.pipeline import Bench

OVERRIDES = ["-S", "data.shapes.n_train=400", "-S", "experts.num_experts=2", "-S", "experts.epochs=3",
             "-S", "eval.students=1", "-S", "eval.epochs=30", "-S", "eval.protocols=[strict]",
             "-S", "full_data.epochs=6", "-S", "tracking.enabled=false"]


@pytest.mark.slow
def test_full_data_student_beats_every_coreset_at_every_budget(tmp_path):
    args = ["--preset", "quick", *OVERRIDES, "--data-root", str(tmp_path / "data"),
            "--results-root", str(tmp_path / "results"), "--no-progress"]
    for stage in ("fetch", "embed", "experts"):
        assert main([stage, *args]) == 0
    cfg = load_config("quick", OVERRIDES[1::2])
    bench = Bench(cfg, Layout(tmp_path / "data", tmp_path / "results"), progress=False)
    full = bench.full_data("shapes")["protocols"]["strict"]["r_mean"]["mean"]
    chance = 100 * (1 + 5 + 10) / 3 / 500  # mean of R@1/5/10 for random scores over 500 test images
    coreset = {}
    for method in ("random", "herding", "kcenter", "forgetting"):
        for budget in (20, 50):
            bench.distill("shapes", method, budget, 0)
            coreset[method, budget] = bench.evaluate("shapes", method, budget, 0)["protocols"]["strict"]["r_mean"][
                "mean"]
    print(f"full-data r_mean {full:.1f}; chance {chance:.2f}; coresets {coreset}")
    assert full > 10 * chance, full
    assert full > 3 * max(coreset.values()), (full, coreset)
