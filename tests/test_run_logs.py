"""Distillation logs and DVC's linked cache: a log is never changed in place (DVC hard-links cached outputs into the
workspace, and equal logs of different cells share one inode with the cache), and a fresh run's log holds that run
only, so re-running a cell reproduces its log byte for byte."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from benchmark.interface import JsonlLogger
from benchmark.stages.cells import Cell
from helpers import tiny_context


def test_appending_never_writes_through_a_hard_link(tmp_path: Path) -> None:
    log_path, cached = tmp_path / "distill_log.jsonl", tmp_path / "cache_object"
    log_path.write_text('{"step": 1, "loss": 2.0}\n')
    os.link(log_path, cached)  # what DVC's hardlink cache type leaves in the workspace
    logger = JsonlLogger(log_path)
    logger.log({"loss": 1.5}, step=2)
    logger.log({"loss": 1.25}, step=3)
    assert cached.read_text() == '{"step": 1, "loss": 2.0}\n'  # the cache object is untouched
    assert log_path.read_text().splitlines()[1:] == ['{"loss": 1.5, "step": 2}', '{"loss": 1.25, "step": 3}']
    assert os.stat(log_path).st_ino != os.stat(cached).st_ino and os.stat(cached).st_nlink == 1


@pytest.fixture
def root(tiny_project, tmp_path) -> Path:
    shutil.copytree(tiny_project[0] / "data", tmp_path / "data")
    return tmp_path


@pytest.mark.parametrize("method", ["herding", "tesla-vl"])
def test_rerunning_a_cell_reproduces_its_log_and_leaves_linked_copies_alone(root: Path, method: str) -> None:
    from benchmark.stages.distill import distill

    ctx = tiny_context(root, [f"grid.methods=[{method}]", "grid.budgets=[10]", "grid.seeds=[0, 1]"])
    first = distill(ctx, Cell("shapes", method, 10, 0)) / "distill_log.jsonl"
    other = distill(ctx, Cell("shapes", method, 10, 1)) / "distill_log.jsonl"
    text = first.read_text()
    assert text  # the method logged something
    other.unlink()
    os.link(first, other)  # as DVC links two cells whose logs have equal bytes to one cache object
    assert distill(ctx, Cell("shapes", method, 10, 0), force=True) == first.parent
    assert first.read_text() == text  # this run's records only, not appended to the last run's
    assert other.read_text() == text and os.stat(first).st_ino != os.stat(other).st_ino
