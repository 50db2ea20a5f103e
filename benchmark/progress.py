"""Progress a person can follow, in a terminal or in a log.

When stderr is a terminal, :class:`Progress` draws a tqdm bar. Otherwise (``dvc repro`` or a sweep writing to a log
file) it logs one line at most every ``interval_s`` seconds (30 by default; ``MMDD_PROGRESS_INTERVAL`` or
:func:`configure`) with done/total, rate and ETA, and a last line when it closes. ``mmdd --no-progress`` turns both
off through :func:`configure`. No torch here: the CLI imports this before any stage.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

log = logging.getLogger("mmdd.progress")
INTERVAL_ENV = "MMDD_PROGRESS_INTERVAL"


@dataclass
class Settings:
    """Process-wide defaults, set once by the CLI."""

    enabled: bool = True
    interval_s: float = 30.0


def _interval_from_env() -> float:
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None:
        return Settings.interval_s
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{INTERVAL_ENV}={raw!r} must be a number of seconds >= 0, e.g. {INTERVAL_ENV}=30")
    return value


SETTINGS = Settings()


def configure(enabled: bool | None = None, interval_s: float | None = None) -> Settings:
    """Set the defaults of every later :class:`Progress` (``None`` keeps a value; the interval reads the env)."""
    if enabled is not None:
        SETTINGS.enabled = enabled
    SETTINGS.interval_s = _interval_from_env() if interval_s is None else interval_s
    return SETTINGS


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Count ``done`` of ``total`` units; a tqdm bar on a terminal, periodic log lines elsewhere.

    ``initial`` units are done before this run (a resumed loop); :meth:`skip` adds units done without work (an
    up-to-date expert). Neither counts toward the rate, so the ETA reflects the work this process does.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", initial: int = 0, enabled: bool | None = None,
                 stream: TextIO | None = None, interval_s: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done = self._free = int(initial)
        self.enabled = SETTINGS.enabled if enabled is None else enabled
        self.interval_s = SETTINGS.interval_s if interval_s is None else interval_s
        self._clock = clock
        self._start = self._last_log = clock()
        self._postfix: dict[str, Any] = {}
        self._bar = None
        self.closed = False
        stream = sys.stderr if stream is None else stream
        if self.enabled and _is_tty(stream):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.done, desc=desc, unit=unit, file=stream, leave=False,
                             dynamic_ncols=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(finished=exc[0] is None)

    def rate(self) -> float:
        """Units per second over the work done by this process (0 before any)."""
        elapsed = self._clock() - self._start
        work = self.done - self._free
        return work / elapsed if elapsed > 0 and work > 0 else 0.0

    def eta_s(self) -> float:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 else math.inf

    def line(self) -> str:
        """``desc: done/total unit (pct%), rate, ETA`` plus any postfix values."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f}%)",
                 f"{self.rate():.3g} {self.unit}/s", f"ETA {format_duration(self.eta_s())}"]
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        return ", ".join(parts)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` values (e.g. ``loss=...``) are shown with the next line."""
        self.done += n
        self._postfix.update(postfix)
        if not self.enabled:
            return
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(self._postfix, refresh=False)
            self._bar.update(n)
            return
        now = self._clock()
        if now - self._last_log >= self.interval_s and self.done < self.total:
            self._last_log = now
            log.info("%s", self.line())

    def skip(self, n: int) -> None:
        """``n`` units that needed no work (kept outputs): counted as done, not in the rate."""
        self.done += n
        self._free += n
        if self._bar is not None:
            self._bar.update(n)

    def close(self, finished: bool = True) -> None:
        """Remove the bar; in a log, one last line when the loop ran to its end."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and finished and self.done > self._free:
            elapsed = self._clock() - self._start
            log.info("%s: %d/%d %s in %s (%.3g %s/s)", self.desc, self.done, self.total, self.unit,
                     format_duration(elapsed), self.rate(), self.unit)


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False
