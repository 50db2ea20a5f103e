"""``python -m benchmark.sweep ...``: the same as ``mmdd sweep ...``."""

from __future__ import annotations

import argparse
import logging
import sys

from benchmark.sweep import add_sweep_command, run_sweep_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.sweep")
    sub = parser.add_subparsers(dest="command", required=True)
    add_sweep_command(sub)
    args = parser.parse_args(["sweep", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run_sweep_command(args)
    except (RuntimeError, ValueError) as exc:
        logging.getLogger("mmdd.sweep").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
