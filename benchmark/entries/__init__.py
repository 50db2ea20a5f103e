"""Benchmark entries: ``mmdd new-method`` scaffolds a method, ``mmdd check-entry`` verifies one.

An entry passes when it

1. **registers** (in-tree decorator, or the ``mmdd.methods`` entry point of an out-of-tree package);
2. returns a **valid** DistilledSet on the tiny preset: within the budget, right shapes, float32, finite;
3. is **deterministic**: two runs with the same seed give identical sets;
4. **resumes**: a run interrupted after a checkpoint continues from it to the same set as an uninterrupted run;
5. runs in a **container** (when Docker is available) through the same runner the benchmark uses.

Each failure names its rule. ``add_entry_commands`` / ``run_entry_command`` plug both commands into ``mmdd``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from pathlib import Path
from typing import Any

from benchmark import argtypes

__all__ = ["ENTRY_COMMANDS", "CheckResult", "EntryReport", "add_entry_commands", "check_entry", "default_data_root",
           "load_project_entry", "run_entry_command", "scaffold_in_tree", "scaffold_package"]

log = logging.getLogger(__name__)
ENTRY_COMMANDS = ("new-method", "check-entry")
# Imported on first use: the checker imports torch, and `mmdd --help` builds this package's parsers.
_LAZY = {"CheckResult": "check", "EntryReport": "check", "check_entry": "check", "default_data_root": "check",
         "load_project_entry": "check", "scaffold_in_tree": "scaffold", "scaffold_package": "scaffold"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


def add_entry_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``new-method`` and ``check-entry`` to ``mmdd``'s sub-commands."""
    p = subparsers.add_parser("new-method", help="scaffold a method entry (class, per-preset defaults, README, test)",
                              description="Scaffold a method: in-tree under methods/ (default, run from the "
                                          "repository root) or an out-of-tree package with --out-of-tree DIR.")
    p.add_argument("name", help="method name, e.g. my_method")
    p.add_argument("--out-of-tree", metavar="DIR", default=None,
                   help="create a separate package in DIR that registers through the mmdd.methods entry point")
    p.add_argument("--root", default=".", help="repository root for an in-tree method [.]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run_entry_command)
    p = subparsers.add_parser("check-entry", help="verify a method entry on the tiny preset",
                              description="Verify an entry: it registers, returns a valid DistilledSet within the "
                                          "budget, is deterministic, resumes after interruption and runs in a "
                                          "container (when Docker is available). Exit 1 names the failed rule.")
    p.add_argument("name", help="registered method name")
    p.add_argument("--project", default=None, metavar="DIR",
                   help="out-of-tree package directory (not yet installed) to register the entry from")
    p.add_argument("--data-root", default=None,
                   help="where tiny data is prepared [~/.cache/mmdd/check-entry/data; $XDG_CACHE_HOME replaces "
                        "~/.cache]")
    p.add_argument("--budget", type=argtypes.budget, default=None, help="pairs [first budget of the tiny preset]")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the checked runs [0]")
    p.add_argument("--docker", choices=("auto", "off", "require"), default="auto",
                   help="container check: run it when Docker answers (auto), skip it (off), or fail without it "
                        "(require) [auto]; the image comes from MMDD_DOCKER_IMAGE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run_entry_command)


def run_entry_command(args: argparse.Namespace) -> int:
    """Run ``new-method`` or ``check-entry``: 0 on success, 1 when a check fails, 2 on bad input."""
    from benchmark.entries.check import check_entry
    from benchmark.entries.scaffold import scaffold_in_tree, scaffold_package

    try:
        if args.command == "new-method":
            if args.out_of_tree:
                paths = scaffold_package(args.name, Path(args.out_of_tree))
                then = (f"`mmdd check-entry {args.name} --project {args.out_of_tree}`; "
                        f"`pip install -e {args.out_of_tree}` registers it")
            else:
                paths = scaffold_in_tree(args.name, Path(args.root))
                then = f"`mmdd check-entry {args.name}`"
            method_py = next(p for p in [*paths, *(q / "method.py" for q in paths)] if p.name == "method.py")
            hint = f"implement {method_py}, then {then}"
            print("\n".join(f"created {p}" for p in paths) + f"\nnext: {hint}; see SUBMITTING.md")
            return 0
        report = check_entry(args.name, project=Path(args.project) if args.project else None,
                             data_root=Path(args.data_root) if args.data_root else None, budget=args.budget,
                             seed=args.seed, docker=args.docker)
        print(report.render())
        return 0 if report.ok else 1
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
