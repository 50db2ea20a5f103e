"""benchmark.progress (issue #15): off a terminal, one line at most every interval with done/total, rate and ETA; on
a terminal, a bar; expert training reports through it."""

import io
import logging
import os
import subprocess
import sys

import pytest

from benchmark import progress
from benchmark.progress import Progress, format_duration


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def progress_lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mmdd.progress"]


def test_log_lines_are_rate_limited_and_carry_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger="mmdd.progress")
    clock = Clock()
    bar = Progress(100, "tesla-vl phase 1/2", stream=io.StringIO(), interval_s=30, clock=clock, enabled=True)
    for _ in range(100):
        clock.now += 2.0  # 0.5 it/s
        bar.update(loss="0.1234")
    bar.close()
    lines = progress_lines(caplog)
    # 200 s of work, a line at most every 30 s (6 of them: 15, 30, ... 90 iterations), then the closing line
    assert len(lines) == 7, lines
    assert lines[0] == "tesla-vl phase 1/2: 15/100 it (15%), 0.5 it/s, ETA 0:02:50, loss 0.1234"
    assert lines[-1] == "tesla-vl phase 1/2: 100/100 it in 0:03:20 (0.5 it/s)"


def test_resumed_and_skipped_units_do_not_inflate_the_rate(caplog):
    caplog.set_level(logging.INFO, logger="mmdd.progress")
    clock = Clock()
    bar = Progress(40, "experts (4 x 10 epochs)", "epoch", initial=10, stream=io.StringIO(), interval_s=5,
                   clock=clock, enabled=True)
    bar.skip(10)  # an up-to-date expert: no work
    for _ in range(5):
        clock.now += 1.0
        bar.update()
    assert bar.rate() == pytest.approx(1.0)
    assert bar.eta_s() == pytest.approx(15.0)
    assert progress_lines(caplog) == ["experts (4 x 10 epochs): 25/40 epoch (62%), 1 epoch/s, ETA 0:00:15"]


TERMINAL_SNIPPET = """
import io, logging
records = []
logging.getLogger("mmdd.progress").addHandler(type("H", (logging.Handler,), {"emit": lambda s, r: records.append(r)})())
logging.getLogger("mmdd.progress").setLevel(logging.INFO)
from benchmark.progress import Progress
class Terminal(io.StringIO):
    def isatty(self):
        return True
term = Terminal()
with Progress(10, "expert 3", "epoch", stream=term, interval_s=0, enabled=True) as bar:
    for _ in range(10):
        bar.update()
print(repr(term.getvalue()))
print(len(records))
"""


def test_terminal_gets_a_bar_and_no_log_lines():
    # tqdm reads TQDM_DISABLE when it is imported, and conftest sets it for the whole session: run in a fresh
    # interpreter whose environment does not disable tqdm, as a user's terminal would
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", TERMINAL_SNIPPET], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    bar, n_log_lines = out[-2], out[-1]
    assert "expert 3:" in bar and "/10 [" in bar  # tqdm redraws at most every 0.1 s
    assert n_log_lines == "0"


def test_disabled_progress_is_silent(caplog):
    caplog.set_level(logging.INFO, logger="mmdd.progress")
    term = Terminal()
    with Progress(3, "x", stream=term, interval_s=0, enabled=False) as bar:
        bar.update(3)
    assert term.getvalue() == "" and progress_lines(caplog) == []


def test_interval_comes_from_the_environment_and_is_validated(monkeypatch):
    before = (progress.SETTINGS.enabled, progress.SETTINGS.interval_s)
    try:
        monkeypatch.setenv(progress.INTERVAL_ENV, "2.5")
        assert progress.configure(enabled=True).interval_s == 2.5
        monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
        with pytest.raises(ValueError, match="MMDD_PROGRESS_INTERVAL='soon'"):
            progress.configure()
    finally:
        progress.configure(*before)
    assert format_duration(3725) == "1:02:05" and format_duration(float("inf")) == "?"


def test_expert_training_logs_progress_off_a_terminal(caplog):
    from benchmark.experts.train import ExpertConfig, train_experts
    from helpers import random_train, tiny_student

    caplog.set_level(logging.INFO, logger="mmdd.progress")
    before = progress.SETTINGS.interval_s
    progress.configure(interval_s=0.0)
    try:
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            cfg = ExpertConfig(num_experts=2, epochs=2, batch_size=8, num_workers=0)
            train_experts(out, random_train(), tiny_student(), cfg, "data-id")
    finally:
        progress.configure(interval_s=before)
    lines = progress_lines(caplog)
    assert lines[0].startswith("experts (2 x 2 epochs): 1/4 epoch (25%), ") and "ETA" in lines[0]
    assert lines[-1].startswith("experts (2 x 2 epochs): 4/4 epoch in ")
