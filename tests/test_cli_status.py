"""`mmdd status` (issue #15) on a tiny DVC project: done / stale / remaining per stage kind, ETA from measured times."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmark.cli import main
from test_cli_errors import mmdd_env
from tests.helpers import copy_repo

GRID = ["-S", "grid.methods=[random]", "-S", "grid.budgets=[10]", "-S", "grid.seeds=[0,1]"]
pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(Path(sys.executable).parent)) is None,
                                reason="dvc not installed in this env")


def run(cmd, cwd):
    res = subprocess.run(cmd, cwd=cwd, env=mmdd_env(TQDM_DISABLE="1"), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def status(root, capsys, *extra):
    assert main(["status", "--project", str(root), *extra]) == 0
    out = capsys.readouterr().out
    return json.loads(out) if "--json" in extra else out


def test_status_counts_done_stale_remaining_and_estimates_from_measured_times(tmp_path, capsys):
    root = copy_repo(tmp_path / "proj")
    (root / "dvc.lock").unlink(missing_ok=True)  # a fresh project: nothing ran yet
    run(["git", "init", "-q"], root)
    mmdd = [sys.executable, "-m", "benchmark.cli"]
    run([*mmdd, "init-params", "--preset", "tiny", *GRID], root)
    run([sys.executable, "-m", "dvc", "repro", "fetch@shapes"], root)
    # seed 1's cell ran before (its measured times are on disk); seed 0's never did
    cell1 = root / "results/cells/tiny/shapes/random/b10/s1"
    cell1.mkdir(parents=True)
    (cell1 / "distill.volatile.json").write_text(json.dumps({"seconds": 12.5, "pairs": 10}))
    (cell1 / "evaluate.volatile.json").write_text(json.dumps({"eval_seconds": 30.0, "distill_seconds": 12.5}))

    doc = status(root, capsys, "--json")
    counts = doc["counts"]
    assert counts["fetch"] == {"done": 1, "stale": 0, "remaining": 0}
    assert counts["embed"] == {"done": 0, "stale": 0, "remaining": 1}
    assert counts["distill"] == {"done": 0, "stale": 0, "remaining": 2}
    assert counts["evaluate"] == {"done": 0, "stale": 0, "remaining": 2}
    assert list(counts)[:2] == ["fetch", "embed"] and list(counts)[-1] == "report"
    estimates = {s["name"]: s["estimate_s"] for s in doc["stages"]}
    assert estimates["distill-random@shapes-10-0"] == 12.5  # from its sibling seed
    assert estimates["evaluate@shapes-random-10-1"] == 30.0
    assert doc["eta_s"] == pytest.approx(2 * 12.5 + 2 * 30.0)
    assert "embed@shapes" in doc["unmeasured"] and "fetch@shapes" not in doc["unmeasured"]

    # a changed parameter of the fetched dataset makes it stale (it ran, it must rerun)
    run([*mmdd, "init-params", "--preset", "tiny", *GRID, "-S", "data.shapes.n_train=100"], root)
    table = status(root, capsys)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[1:-1]}
    assert rows["fetch"][:3] == ["0", "1", "0"] and rows["distill"] == ["0", "0", "2", "0:00:25"]
    assert table.splitlines()[-1].startswith("ETA >= 0:01:25 for ")


def test_status_outside_a_dvc_project_names_the_fix(tmp_path, caplog):
    assert main(["status", "--project", str(tmp_path)]) == 2
    assert "no dvc.yaml" in caplog.text and "mmdd init-params" in caplog.text
