"""Researcher experience of `mmdd` (issue #15): a fast --help, --version, a description for every command and option,
and one line (exit 2, no traceback) for every bad input; Ctrl-C exits 130 with one line."""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmark.cli import build_parser
from helpers import tiny_params

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def mmdd_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "TQDM_DISABLE")}
    env.update(PYTHONPATH=str(REPO), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def mmdd(*args, cwd=None, timeout=120, **env):
    return subprocess.run([sys.executable, "-m", "benchmark.cli", *map(str, args)], cwd=cwd, env=mmdd_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(res, *fragments):
    """Exit 2, no traceback, exactly one non-empty stderr line holding every fragment."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def params(tmp_path_factory):
    return tiny_params(tmp_path_factory.mktemp("params"))


def test_help_imports_no_torch_and_version_is_the_installed_one():
    code = ("import sys; from benchmark.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'dvc', 'numpy'))\n"
            "print('HEAVY', heavy)")
    res = subprocess.run([sys.executable, "-c", code], env=mmdd_env(), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "HEAVY []" in res.stdout and "status" in res.stdout and "ui" in res.stdout
    from importlib.metadata import version

    res = mmdd("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"mmdd {version('mmdd-bench')}"


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def test_every_command_and_option_is_described():
    parser = build_parser()
    listed = {a.dest: a.help for a in next(a for a in parser._actions
                                          if isinstance(a, argparse._SubParsersAction))._choices_actions}
    missing = []
    for name, sub in _subparsers(parser):
        if not listed.get(name) or not sub.description:
            missing.append(f"{name} (description)")
        missing += [f"{name} {a.option_strings or a.dest}" for a in sub._actions
                    if not a.help or a.help == argparse.SUPPRESS]
    assert missing == []


def test_methods_prints_descriptions_not_module_paths():
    res = mmdd("methods")
    assert res.returncode == 0, res.stderr
    lines = dict(line.split(None, 1) for line in res.stdout.splitlines())
    assert {"random", "herding", "tesla-vl", "lors"} <= set(lines)
    assert not [d for d in lines.values() if d.startswith("methods.")], lines
    assert lines["tesla-vl"].startswith("TESLA-VL:")


def test_wrong_type_in_an_override_names_the_key_the_value_and_the_fix(params):
    res = mmdd("fetch", "--params", params, "-S", "eval.students=abc")
    one_line_error(res, "eval.students='abc'", "must be int", "-S eval.students")
    res = mmdd("init-params", "--preset", "tiny", "--out", params.parent / "p2.yaml", "-S", "experts.lr_img=1e-3")
    one_line_error(res, "experts.lr_img='1e-3'", "must be float", "1.0e-3")
    assert not (params.parent / "p2.yaml").exists()


def test_malformed_preset_file_is_one_line(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("grid:\n  methods: [random\n  budgets: [10]\n")
    res = mmdd("init-params", "--preset", bad, "--out", tmp_path / "params.yaml")
    one_line_error(res, str(bad), "not valid YAML", "fix the file")


@pytest.mark.parametrize("budget", ["0", "-5", "ten"])
@pytest.mark.parametrize("command", ["distill", "evaluate", "check-entry"])
def test_budget_must_be_a_positive_integer(budget, command):
    args = ["check-entry", "random"] if command == "check-entry" else [command, "--method", "random"]
    res = mmdd(*args, "--budget", budget)
    one_line_error(res, "--budget", repr(budget) if budget == "ten" else budget, "e.g. 10")


def test_cuda_without_a_gpu_fails_before_any_work(params, tmp_path):
    # no GPU visible, as on a CPU-only machine; the error must come before the stage touches data or results
    res = mmdd("distill", "--params", params, "--data-root", tmp_path / "data", "--results-root", tmp_path / "res",
               "--method", "random", "--budget", "10", "--seed", "0", "--device", "cuda", CUDA_VISIBLE_DEVICES="")
    one_line_error(res, "--device cuda", "torch.cuda.is_available() is False", "--device cpu")
    assert not (tmp_path / "res").exists()
    res = mmdd("bench", "--device", "cuda", "--project", tmp_path, CUDA_VISIBLE_DEVICES="")
    one_line_error(res, "--device cuda", "--device cpu")
    one_line_error(mmdd("fetch", "--params", params, "--device", "gpu0"), "'gpu0' is not a torch device")


def test_ctrl_c_exits_130_with_one_line(tiny_project, tmp_path):
    root, _ = tiny_project
    shutil.copytree(root / "data", tmp_path / "data")
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    # a long expert run (another config: retrains) that logs a progress line per epoch, so we know it is working
    cmd = [sys.executable, "-m", "benchmark.cli", "experts", "--params", str(tmp_path / "params.yaml"),
           "--data-root", str(tmp_path / "data"), "--results-root", str(tmp_path / "results"),
           "-S", "experts.epochs=100000"]
    proc = subprocess.Popen(cmd, env=mmdd_env(MMDD_PROGRESS_INTERVAL="0"), stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        seen.append(line)
        if "experts (2 x 100000 epochs): " in line and "ETA" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, "".join(seen) + rest
    assert "Traceback" not in rest and rest.strip().splitlines()[-1] == "mmdd: interrupted", rest
    assert not list((tmp_path / "data" / "experts").rglob("*.tmp*"))
