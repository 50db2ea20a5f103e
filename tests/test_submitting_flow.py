"""SUBMITTING.md, followed literally: its commands are read from the document itself and run in order in a fresh
copy of the repository, with a fresh environment, until the new method has a row in the results table.

Three things differ from what a contributor types, all because this runs in CI: the results step uses the
`tiny` preset instead of `default` (the same commands; minutes instead of an hour); the new environment reuses the
suite's installed dependencies instead of downloading them again (the suite itself is installed the way the
document says: `pip install --no-deps -e .`); and so `mmdd check-entry` runs with the document's `--docker off`,
since the container rule mounts the environment's site-packages and these dependencies live outside it
(tests/test_entries.py runs the container rule on a scaffolded method).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.helpers import copy_repo

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(shutil.which("dvc", path=str(BIN)) is None, reason="dvc not installed in this env")


def bash_blocks(markdown: str) -> list[list[str]]:
    """The command lines of every ```bash block, in order (comments stripped)."""
    blocks = re.findall(r"```bash\n(.*?)```", markdown, flags=re.S)
    return [[line.split(" #", 1)[0].strip() for line in b.splitlines() if line.strip() and not line.startswith("#")]
            for b in blocks]


def fresh_env(tmp: Path) -> Path:
    """A new virtual environment that sees the suite's dependencies (not the suite): its own `mmdd` comes from the
    `pip install --no-deps -e .` the document asks for."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    # a path added by a .pth file is not a site dir: the suite's own editable install (a .pth there) stays invisible
    (site / "suite_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_submitting_md_from_scaffold_to_a_table_row(tmp_path):
    steps = bash_blocks((REPO / "SUBMITTING.md").read_text())
    scaffold, check, results = steps[0][0], steps[1][0], steps[2]
    assert scaffold == "mmdd new-method my_method" and check == "mmdd check-entry my_method"
    assert results[0].startswith("mmdd init-params --preset default") and results[1] == "mmdd bench"
    root = copy_repo(tmp_path / "repo")
    venv = fresh_env(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{BIN}{os.pathsep}{env.get('PATH', '')}",
               XDG_CACHE_HOME=str(tmp_path / "cache"), VIRTUAL_ENV=str(venv))

    def run(command: str, timeout: float = 1200) -> str:
        argv = shlex.split(command)
        if argv[:3] == ["pip", "install", "--no-deps"]:  # the venv has no pip of its own: drive it from outside
            argv = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-build-isolation", *argv[3:]]
        res = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        assert res.returncode == 0, f"`{command}` failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        return res.stdout + res.stderr

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    run("pip install --no-deps -e .")  # the suite, as the document's reinstall step installs it
    # 1. Scaffold
    run(scaffold)
    assert (root / "methods/my_method/method.py").is_file()
    assert 'my_method = "methods.my_method.method:MyMethodMethod"' in (root / "pyproject.toml").read_text()
    run("pip install --no-deps -e .")  # "reinstall with `pip install --no-deps -e .`"
    assert "my_method" in run("mmdd methods")
    # 3. Check, with the document's `--docker off`: the container rule mounts the environment's site-packages, and
    # this environment's dependencies live outside it (see fresh_env); tests/test_entries.py runs that rule
    out = run(f"{check} --docker off")
    assert "check-entry my_method: passed" in out and "SKIP  container" in out, out[-2000:]
    # How results get into the tables (tiny preset instead of default: the same commands, minutes not an hour)
    init = results[0].replace("--preset default", "--preset tiny")
    init = re.sub(r'"grid\.methods=\[[^]]*\]"', '"grid.methods=[random,my_method]"', init)
    assert init != results[0] and "my_method" in init
    run(init)
    run(results[1], timeout=1800)
    table = (root / "results/tables/tiny/shapes.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| my_method ")]
    assert rows and all("±" in r for r in rows), table  # a row per protocol, with its interval over seeds
