"""Reproducible to the byte: the same pipeline run in two fresh copies of the repository, in separate processes,
records identical hashes in dvc.lock (every DVC-tracked output is a pure function of its inputs)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import copy_repo

BIN = Path(sys.executable).parent
GRID = ["-S", "grid.methods=[random,lors,ptm-st]", "-S", "grid.budgets=[10]", "-S", "grid.seeds=[0]",
        "-S", "eval.students=1", "-S", "tracking.enabled=false"]

pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="dvc not installed in this env")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TQDM_DISABLE"] = "1"
    return env


@pytest.mark.slow
def test_two_fresh_copies_record_identical_dvc_locks(tmp_path):
    roots = [copy_repo(tmp_path / name) for name in ("a", "b")]
    for root in roots:
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        subprocess.run(["mmdd", "init-params", "--preset", "tiny", *GRID], cwd=root, env=_env(), check=True,
                       capture_output=True)
    procs = [subprocess.Popen(["dvc", "repro"], cwd=root, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for root in roots]
    outs = [p.communicate(timeout=1500)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    locks = [(root / "dvc.lock").read_text() for root in roots]
    assert "distilled.safetensors" in locks[0] and "prepare-ptm-st@shapes" in locks[0]
    assert locks[0] == locks[1]
    for name in ("results/tables/tiny/shapes.md", "results/tables/tiny/shapes.csv", "results/metrics/tiny.json"):
        assert (roots[0] / name).read_bytes() == (roots[1] / name).read_bytes(), name
