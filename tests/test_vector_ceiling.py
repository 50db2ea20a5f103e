"""The vectorisation ceiling (benchmark/perf/vector_ceiling.py): its formula, and its premise that the tiny
configuration runs exactly the operators of the real one."""

from __future__ import annotations

import math

import pytest
import torch

from benchmark.perf import bench_matching as bm
from benchmark.perf.vector_ceiling import FULL, TINY, ceiling, matching_iteration, op_trace, student_step


def test_ceiling_known_answers() -> None:
    assert ceiling(1.0, 0.0, 5) == 1.0  # no fixed cost: nothing to save
    assert ceiling(1.0, 1.0, 5) == 5.0  # all fixed cost: K copies for the price of one
    assert ceiling(2.0, 1.0, 3) == pytest.approx(6.0 / 4.0)  # 3·2 / (3·1 + 1)
    assert ceiling(2.0, 0.7, 1) == 1.0
    assert ceiling(2.0, 1.0, math.inf) == 2.0
    assert ceiling(2.0, 1.0, 3) < ceiling(2.0, 1.0, 5) < ceiling(2.0, 1.0, math.inf)
    with pytest.raises(ValueError, match="fixed"):
        ceiling(1.0, 1.5, 5)


def test_op_trace_sees_forward_and_backward() -> None:
    w = torch.randn(3, requires_grad=True)
    ops = op_trace(lambda: (w * 2).sum().backward())
    assert ops[:2] == ["aten.mul", "aten.sum"]
    assert len(ops) > 2  # the backward's operators follow


@pytest.mark.parametrize("cell", ["tesla-vl", "mtt-vl"])
def test_tiny_matching_iteration_runs_the_same_operators(tmp_path, cell) -> None:
    dev = torch.device("cpu")
    fns = {}
    for size in (FULL, TINY):
        spec = dict(bm.QUICK_STUDENT, image_size=size["image_size"])
        experts = bm.make_experts(tmp_path / str(size["image_size"]), spec, 2, 3)
        fns[size["image_size"]] = matching_iteration(cell, size, experts, dev)
    full, tiny = op_trace(fns[FULL["image_size"]]), op_trace(fns[TINY["image_size"]])
    assert full == tiny
    assert "aten.convolution_backward" in full and "aten.native_group_norm_backward" in full


def test_tiny_student_step_runs_the_same_operators() -> None:
    dev = torch.device("cpu")
    full, tiny = op_trace(student_step(FULL, dev)), op_trace(student_step(TINY, dev))
    assert full == tiny
    assert "aten.convolution_backward" in full
