"""Container-side entry point: register out-of-tree methods named on the command line, then run ``mmdd``.

``python -m benchmark.method_entry [--register NAME=MODULE:CLASS ...] -- run-method ...`` mirrors what the
``mmdd.methods`` entry-point group does on the host, for an entry whose package is mounted rather than installed.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmark.registry import register_method


def _load(ref: str) -> type:
    module, _, qualname = ref.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m benchmark.method_entry")
    parser.add_argument("--register", action="append", default=[], metavar="NAME=MODULE:CLASS")
    args = parser.parse_args(own)
    for item in args.register:
        name, _, ref = item.partition("=")
        register_method(name)(_load(ref))
    from benchmark.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
