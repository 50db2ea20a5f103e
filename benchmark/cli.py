"""``mmdd``: the command-line front end. Each stage command runs one stage function of :mod:`benchmark.stages` on
the configuration in ``params.yaml`` (written by ``mmdd init-params``); ``dvc.yaml`` calls exactly these commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("mmdd")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml",
                   help="the resolved configuration, written by `mmdd init-params` [params.yaml]")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value for this run only, e.g. -S eval.students=5 (repeatable)")
    p.add_argument("--dataset", action="append", default=None, help="restrict to this dataset (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 [cpu]")
    p.add_argument("--data-root", default=None, help="root of data/ (raw, features, experts) [params data.root]")
    p.add_argument("--results-root", default="results", help="root of results/ [results]")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cell_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", action="append", default=None, help="method name (repeatable) [grid.methods]")
    p.add_argument("--budget", type=int, action="append", default=None, help="pairs (repeatable) [grid.budgets]")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable) [grid.seeds]")
    p.add_argument("--force", action="store_true", help="recompute even when the output is up to date")


def _context(args):
    from benchmark.stages.context import make_context

    return make_context(args.params, args.overrides, args.dataset, args.device, args.data_root, args.results_root,
                        progress=not args.no_progress)


def _cells(ctx, args):
    for m in args.method or []:
        if m not in ctx.cfg.grid.methods:
            raise ValueError(f"method {m!r} is not in params.yaml's grid.methods {ctx.cfg.grid.methods}: add it with "
                             "`mmdd init-params --preset <name> -S grid.methods=[...]`")
    for b in args.budget or []:
        if b not in ctx.cfg.grid.budgets:
            raise ValueError(f"budget {b} is not in params.yaml's grid.budgets {ctx.cfg.grid.budgets}: regenerate "
                             "params.yaml with it (`mmdd init-params ... -S grid.budgets=[...]`)")
    return ctx.cells(methods=args.method, budgets=args.budget, seeds=args.seed)


# ---------------------------------------------------------------------------------------------- commands
def cmd_methods(args) -> int:
    from benchmark.registry import available_methods, get_method

    for name in available_methods():
        print(f"{name:12s} {get_method(name).description()}")
    return 0


def cmd_init_params(args) -> int:
    from benchmark.params import write_params

    dvc_yaml = None if args.no_dvc_yaml else args.dvc_yaml
    out = write_params(args.preset, args.out, args.overrides, dvc_yaml=dvc_yaml, root=Path(args.out).parent)
    log.info("wrote %s%s", out, f" and {dvc_yaml}" if dvc_yaml else "")
    return 0


def cmd_ui(args) -> int:
    from benchmark.tracking import serve_ui, tracking_uri

    return serve_ui(tracking_uri(Path(args.results_root).resolve()), args.host, args.port)


def per_dataset(stage: str):
    def run(args) -> int:
        import importlib

        ctx = _context(args)
        fn = getattr(importlib.import_module(f"benchmark.stages.{stage}"), stage)
        for ds in ctx.cfg.datasets:
            if stage == "experts":
                fn(ctx, ds, args.index)
            elif stage == "prepare":
                for m in args.method or ctx.cfg.grid.methods:
                    fn(ctx, ds, m)
            elif stage == "full_data":
                r = fn(ctx, ds)["protocols"]["strict"]["r_mean"]
                log.info("%s full data: r_mean %.2f ± %.2f", ds, r["mean"], r["std"])
            else:
                fn(ctx, ds)
        return 0

    return run


def cmd_distill(args) -> int:
    from benchmark.stages.distill import distill

    ctx = _context(args)
    for cell in _cells(ctx, args):
        distill(ctx, cell, force=args.force, runner=args.runner)
    return 0


def cmd_run_method(args) -> int:
    from benchmark.stages.cells import Cell
    from benchmark.stages.distill import run_method

    ctx = _context(args)
    run_method(ctx, Cell(ctx.cfg.datasets[0], args.method, args.budget, args.seed), Path(args.work_dir))
    return 0


def cmd_evaluate(args) -> int:
    from benchmark.stages.evaluate import evaluate

    ctx = _context(args)
    for cell in _cells(ctx, args):
        res = evaluate(ctx, cell, force=args.force)
        for proto, summary in res["protocols"].items():
            log.info("%s %s: r_mean %.2f ± %.2f", cell, proto, summary["r_mean"]["mean"], summary["r_mean"]["std"])
    return 0


def cmd_report(args) -> int:
    from benchmark.stages.report import report

    ctx = _context(args)
    for ds, md in report(ctx).items():
        print(f"\n## {ds} ({ctx.cfg.preset} preset)\n")
        print(md)
    log.info("tables, plots and README written under %s", ctx.layout.results_root)
    return 0


def cmd_bench(args) -> int:
    """Every stale stage of dvc.yaml, in order, through the sweep's local executor; recorded with DVC."""
    from benchmark.sweep import run_sweep_command

    args.targets, args.runner, args.address, args.retries = [], "local", None, 0
    args.cpus_per_task, args.gpus_per_task, args.env, args.log_dir = 1.0, 0, [], "results/logs"
    args.dry_run = False
    return run_sweep_command(args)


# ---------------------------------------------------------------------------------------------- parser
STAGE_HELP = {
    "fetch": "download (or generate) datasets into data/raw",
    "embed": "caption features with the frozen text encoder",
    "experts": "train expert trajectories",
    "prepare": "build the artifacts the methods' requirements ask for (e.g. shortcut teachers)",
    "full-data": "reference students trained on the whole training split",
    "report": "tables, plots and results/README.md over the grid",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdd", description="mmdd-bench: multimodal dataset distillation benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("methods", help="list registered methods", description="list registered methods")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("init-params", help="write params.yaml and dvc.yaml from a preset",
                       description="Resolve a preset (every method's parameters for every dataset and budget) into "
                                   "params.yaml, and render the matching dvc.yaml.")
    p.add_argument("--preset", default="quick", help="preset name (quick, paper, tiny) or a YAML path [quick]")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. -S grid.seeds=[0,1] (repeatable)")
    p.add_argument("--out", default="params.yaml", help="output path [params.yaml]")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="where to render the pipeline [dvc.yaml]")
    p.add_argument("--no-dvc-yaml", action="store_true", help="write params.yaml only")
    p.set_defaults(func=cmd_init_params)
    p = sub.add_parser("ui", help="open the MLflow UI on the benchmark's tracking store",
                       description="open the MLflow UI on the benchmark's tracking store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on [127.0.0.1]")
    p.add_argument("--port", type=int, default=5000, help="port to listen on [5000]")
    p.add_argument("--results-root", default="results", help="results/ of the project whose store to open")
    p.set_defaults(func=cmd_ui)
    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        if name == "experts":
            p.add_argument("--index", type=int, action="append", default=None,
                           help="train only these expert indices (for parallel workers)")
        if name == "prepare":
            p.add_argument("--method", action="append", default=None, help="method (repeatable) [grid.methods]")
        p.set_defaults(func=cmd_report if name == "report" else per_dataset(name.replace("-", "_")))
    p = sub.add_parser("run-method", help="run one method for one cell and write its raw DistilledSet to "
                       "--work-dir (no validation, no evaluation: what a container runner executes)",
                       description="run one method for one cell (what a container runner executes)")
    _common(p)
    p.add_argument("--method", required=True, help="method name")
    p.add_argument("--budget", type=int, required=True, help="pairs")
    p.add_argument("--seed", type=int, required=True, help="seed")
    p.add_argument("--work-dir", required=True, help="output directory (the only writable path in a container)")
    p.set_defaults(func=cmd_run_method)
    p = sub.add_parser("distill", help="distil grid cells (method × budget × seed)",
                       description="distil grid cells (method × budget × seed)")
    _common(p)
    _cell_args(p)
    p.add_argument("--runner", default=os.environ.get("MMDD_RUNNER", "local"),
                   help="where the method runs: local (this process) or docker (an isolated container; the "
                        "harness validates its output) [$MMDD_RUNNER or local]")
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("evaluate", help="evaluate distilled sets with fresh students on the test split",
                       description="evaluate distilled sets with fresh students on the test split")
    _common(p)
    _cell_args(p)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("bench", help="bring every stage of dvc.yaml up to date, in order (recorded with DVC)",
                       description="Run the stale stages of dvc.yaml through the local executor of `mmdd sweep`.")
    p.add_argument("-j", "--jobs", type=int, default=1, help="stages at a time [1]")
    p.add_argument("--device", default=None, help="--device for the tensor stages, e.g. cuda [as dvc.yaml]")
    p.add_argument("--project", default=".", help="project directory [.]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_bench)
    from benchmark.entries import add_entry_commands
    from benchmark.sweep import add_sweep_command

    add_entry_commands(sub)
    add_sweep_command(sub).set_defaults(func=_sweep)
    return parser


def _sweep(args) -> int:
    from benchmark.sweep import run_sweep_command

    return run_sweep_command(args)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    func = getattr(args, "func", None)
    if func is None:  # entry commands dispatch themselves
        from benchmark.entries import run_entry_command

        return run_entry_command(args)
    try:
        return func(args)
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, FloatingPointError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
