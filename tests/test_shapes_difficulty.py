"""`shapes` is hard enough: chance, small coresets and a full-data student are far apart (issue: foundation)."""

import pytest

from benchmark.cli import main
from benchmark.stages.cells import Cell
from benchmark.stages.distill import distill
from benchmark.stages.evaluate import evaluate
from benchmark.stages.full_data import full_data
from helpers import stage_args, tiny_context, tiny_params

OVERRIDES = ["data.shapes.n_train=400", "experts.num_experts=2", "experts.epochs=3", "eval.students=1",
             "eval.epochs=30", "eval.protocols=[strict]", "full_data.epochs=6", "tracking.enabled=false",
             "grid.methods=[random,herding,kcenter,forgetting]", "grid.budgets=[20,50]",
             "full_data.expert_epochs=[]", "report.study=[]", "methods={}", "cross_arch.methods=[]"]


@pytest.mark.slow
def test_full_data_student_beats_every_coreset_at_every_budget(tmp_path):
    tiny_params(tmp_path, OVERRIDES, preset="default")
    for stage in ("fetch", "embed", "experts"):
        assert main([stage, *stage_args(tmp_path)]) == 0
    ctx = tiny_context(tmp_path, OVERRIDES, preset="default")
    full = full_data(ctx, "shapes")["protocols"]["strict"]["r_mean"]["mean"]
    chance = 100 * (1 + 5 + 10) / 3 / 500  # mean of R@1/5/10 for random scores over 500 test images
    coreset = {}
    for method in ("random", "herding", "kcenter", "forgetting"):
        for budget in (20, 50):
            cell = Cell("shapes", method, budget, 0)
            distill(ctx, cell)
            coreset[method, budget] = evaluate(ctx, cell)["protocols"]["strict"]["r_mean"]["mean"]
    print(f"full-data r_mean {full:.1f}; chance {chance:.2f}; coresets {coreset}")
    assert full > 10 * chance, full
    assert full > 3 * max(coreset.values()), (full, coreset)
