"""Argument types of the ``mmdd`` command line: a bad value fails at parse time with one line naming it and the fix.

A module of its own so that ``benchmark.cli`` and the commands it plugs in (``benchmark.entries``) share them
without importing each other; nothing here imports torch.
"""

from __future__ import annotations

import argparse


def _int(text: str, what: str, example: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer: pass {what}, e.g. {example}") from None


def budget(text: str) -> int:
    """A budget: a positive number of image-text pairs."""
    value = _int(text, "a number of pairs >= 1", "10")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number of pairs: pass a budget >= 1, e.g. 10")
    return value


def seed(text: str) -> int:
    """A seed: an integer >= 0."""
    value = _int(text, "a seed >= 0", "0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: pass a seed >= 0, e.g. 0")
    return value


def positive_int(text: str) -> int:
    """A count >= 1 (jobs, workers)."""
    value = _int(text, "a count >= 1", "1")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1: pass a count >= 1, e.g. 1")
    return value


def non_negative_int(text: str) -> int:
    """An index or count >= 0 (expert index, retries)."""
    value = _int(text, "an integer >= 0", "0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative: pass an integer >= 0, e.g. 0")
    return value


def port(text: str) -> int:
    """A TCP port, 0 meaning any free one."""
    value = _int(text, "a port 0-65535 (0: any free port)", "0")
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: pass 0-65535 (0: any free port)")
    return value
