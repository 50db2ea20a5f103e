"""A long-running server child (the MLflow UI) that never outlives ``mmdd``.

The child starts in a process group of its own; whatever way this process leaves :func:`run_server` (the server
failing to start, the server dying, Ctrl-C, SIGTERM), the whole group is terminated, then killed, so helper
processes the server spawned (MLflow's job runner) go with it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

log = logging.getLogger("mmdd.ui")
STOP_GRACE_S = 10.0


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str) -> int:
    """A port on ``host`` that nothing listens on now (the OS picks it)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_free_port(host: str, port: int) -> int:
    """``port`` if a server could listen on it; a ValueError naming the fix otherwise."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is not "busy"
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--port {port}: {host}:{port} is not available ({exc.strerror}): pick another --port, "
                             "or --port 0 for a free one") from None
    return port


def server_url(host: str, port: int) -> str:
    probe = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{probe}]:{port}" if ":" in probe else f"http://{probe}:{port}"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
            return resp.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> bool:
    """Until the server answers ``/health`` (True), exits, or ``timeout_s`` passes (False, logged)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.error("the server exited with code %s before it answered at %s (see its output above)",
                      proc.returncode, url)
            return False
        if _answers(url):
            return True
        time.sleep(0.5)
    log.error("the server did not answer at %s within %.0f s: raise --timeout, or check its output above", url,
              timeout_s)
    return False


def stop_group(proc: subprocess.Popen) -> None:
    """Terminate the child's process group, then kill what is left after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while proc.poll() is None or _group_alive(proc.pid):  # poll() reaps the leader, else it stays a zombie
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        else:
            break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _sigterm_as_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_server(cmd: list[str], host: str, port: int, timeout_s: float) -> int:
    """Run ``cmd`` (a server for ``host:port``) until Ctrl-C; 1 when it fails to start or stops by itself."""
    url = server_url(host, port)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _sigterm_as_exit)  # so the group is stopped on `kill` too
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        if not wait_ready(proc, url, timeout_s):
            return 1
        log.info("MLflow UI at %s (Ctrl-C stops it)", url)
        code = proc.wait()
        log.error("the server stopped by itself (exit code %s)", code)
        return 1
    finally:
        stop_group(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
