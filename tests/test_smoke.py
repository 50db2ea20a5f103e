"""The smoke preset end to end, as CI runs it: `mmdd init-params --preset smoke` then `mmdd bench` in a fresh copy of
the repository produces the report (main table, phased-teacher study, reference rows), labelled as ranking nothing,
and leaves DVC up to date."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_repo

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="dvc not installed in this env")


def _run(cmd, cwd, timeout=1500):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
def test_smoke_preset_end_to_end(tmp_path):
    root = copy_repo(tmp_path / "repo")
    _run(["git", "init", "-q"], root)
    _run(["mmdd", "init-params", "--preset", "smoke"], root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    _run(["mmdd", "bench"], root)
    page = (root / "results" / "smoke.md").read_text()
    assert "It ranks nothing" in page
    table = (root / "results" / "tables" / "smoke" / "shapes.md").read_text()
    main, study = table.split("### Phased-teacher study", 1)
    variants = [m for m in params["grid"]["methods"] if "__" in m]
    for m in params["grid"]["methods"]:
        if m in variants:
            assert f"| {m} " not in main and f"| {m} " in study, m
        else:
            assert f"| {m} " in main, m
    for ref in ("full-data", "full-data (teacher SGD)", "expert @ epoch 2", "expert @ epoch 1"):
        assert f"| {ref} " in main, ref
    status = _run(["dvc", "status", "--json"], root)
    assert status.stdout.strip() in ("{}", ""), status.stdout
