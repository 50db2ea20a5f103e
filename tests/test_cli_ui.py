"""`mmdd ui` (issue #15): a real MLflow server on a free port, a clear failure on a busy one, and no process left
behind either way."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmark.ui_server import run_server
from test_cli_errors import mmdd, mmdd_env


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live (non-zombie) processes whose command line contains ``marker``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_port_0_serves_the_store_and_ctrl_c_leaves_no_process(tmp_path):
    uri = f"sqlite:///{tmp_path}/ui-free.db"
    # PATH without the venv: the server must run through mmdd's own interpreter, not an `mlflow` found on PATH
    env = mmdd_env(MLFLOW_TRACKING_URI=uri, PATH="/usr/bin:/bin")
    proc = subprocess.Popen([sys.executable, "-m", "benchmark.cli", "ui", "--port", "0", "--timeout", "240"],
                            env=env, stderr=subprocess.PIPE, text=True)
    url = None
    for line in proc.stderr:
        if "MLflow UI at " in line:
            url = line.split("MLflow UI at ")[1].split()[0]
            break
    assert url is not None and proc.poll() is None, proc.stderr.read()
    assert not url.endswith(":0") and not url.endswith(":5000")
    with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b"OK"
    assert processes_mentioning(uri)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 130
    assert rest.strip().splitlines()[-1] == "mmdd: interrupted"
    assert processes_mentioning(uri) == []


def test_busy_port_fails_and_starts_nothing(tmp_path):
    uri = f"sqlite:///{tmp_path}/ui-busy.db"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = mmdd("ui", "--port", port, MLFLOW_TRACKING_URI=uri)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"--port {port}" in res.stderr and "--port 0" in res.stderr
    assert processes_mentioning(uri) == []


def test_a_server_that_dies_early_fails_and_takes_its_children_along(tmp_path):
    # like `mlflow server` on a port taken after the check: the main process exits (even with 0) and leaves a helper
    # process (MLflow's job runner) behind; run_server must fail and kill that helper too
    marker = tmp_path / "helper-alive"
    helper = f"import time; open({str(marker)!r}, 'w').close(); time.sleep(600)"
    server = ("import subprocess, sys, time\n"
              f"subprocess.Popen([sys.executable, '-c', {helper!r}])\n"
              f"while not __import__('os').path.exists({str(marker)!r}): time.sleep(0.05)\n"
              "sys.exit(0)\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    assert run_server([sys.executable, "-c", server], "127.0.0.1", port, timeout_s=60) == 1
    assert time.monotonic() - t0 < 30
    assert marker.exists() and processes_mentioning(str(marker)) == []


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path):
    marker = tmp_path / "silent-server"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = f"import time; {str(marker)!r}; time.sleep(600)"
    assert run_server([sys.executable, "-c", code], "127.0.0.1", port, timeout_s=2) == 1
    assert processes_mentioning(str(marker)) == []
