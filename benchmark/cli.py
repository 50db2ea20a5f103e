"""``mmdd``: the command-line front end. Each subcommand is one pipeline stage (DESIGN §2)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("mmdd")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="quick", help="preset name (quick, paper, tiny) or a YAML path [quick]")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. -S eval.students=5 (repeatable)")
    p.add_argument("--dataset", action="append", default=None, help="restrict to this dataset (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 [cpu]")
    p.add_argument("--data-root", default=None, help="root of data/ (raw, features, experts) [config data.root]")
    p.add_argument("--results-root", default="results", help="root of results/ [results]")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cell_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", action="append", default=None, help="method name (repeatable; default: grid)")
    p.add_argument("--budget", type=int, action="append", default=None, help="pairs (repeatable; default: grid)")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeatable; default: grid)")
    p.add_argument("--force", action="store_true", help="recompute even when the output is up to date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdd", description="mmdd-bench: multimodal dataset distillation benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list registered methods")
    p = sub.add_parser("init-params", help="write params.yaml (the DVC pipeline's parameters) from a preset")
    p.add_argument("--preset", default="quick", help="preset name or YAML path [quick]")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="params.yaml", help="output path [params.yaml]")
    p = sub.add_parser("ui", help="open the MLflow UI on the benchmark's tracking store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--results-root", default="results", help="results/ of the project whose store to open")
    for name, text in (("fetch", "download (or generate) datasets into data/raw"),
                       ("embed", "caption features with the frozen text encoder"),
                       ("experts", "train expert trajectories"),
                       ("shortcut", "build shortcut (straight-line) teachers from the expert trajectories"),
                       ("full-data", "reference students trained on the whole training split"),
                       ("report", "tables over the grid (mean ± std over seeds)"),
                       ("bench", "run every stage of the preset: fetch → embed → experts → distill → evaluate → "
                                 "report")):
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        if name == "experts":
            p.add_argument("--index", type=int, action="append", default=None,
                           help="train only these expert indices (for parallel workers)")
    p = sub.add_parser("run-method", help="run one method for one cell and write its raw DistilledSet to "
                       "--work-dir (no validation, no evaluation: what a container runner executes)")
    _common(p)
    p.add_argument("--method", required=True)
    p.add_argument("--budget", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--work-dir", required=True, help="output directory (the only writable path in a container)")
    for name, text in (("distill", "distil grid cells (method × budget × seed)"),
                       ("evaluate", "evaluate distilled sets with fresh students on the test split")):
        p = sub.add_parser(name, help=text, description=text)
        _common(p)
        _cell_args(p)
        if name == "distill":
            p.add_argument("--runner", default=os.environ.get("MMDD_RUNNER", "local"),
                           help="where the method runs: local (this process) or docker (an isolated container; the "
                                "harness validates its output) [$MMDD_RUNNER or local]")
    from benchmark.entries import add_entry_commands
    from benchmark.sweep import add_sweep_command

    add_entry_commands(sub)
    add_sweep_command(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _bench(args):
    from benchmark.config import load_config
    from benchmark.paths import Layout
    from benchmark.pipeline import Bench

    cfg = load_config(args.preset, args.overrides)
    if args.dataset:
        cfg.datasets = args.dataset
    data_root = args.data_root or cfg.data.root
    return Bench(cfg, Layout(Path(data_root).resolve(), Path(args.results_root).resolve()), args.device,
                 progress=not args.no_progress)


def _cells(bench, args):
    g = bench.cfg.grid
    methods = args.method or g.methods
    budgets = args.budget or g.budgets
    seeds = args.seed if args.seed is not None else g.seeds
    return [(ds, m, b, s) for ds in bench.cfg.datasets for m in methods for b in budgets for s in seeds]


def cmd_methods(args) -> int:
    from benchmark.registry import available_methods, get_method

    for name in available_methods():
        cls = get_method(name)
        doc = (cls.__doc__ or cls.__module__).strip().splitlines()[0]
        print(f"{name:12s} {'(experts) ' if cls.needs_experts else ''}{doc}")
    return 0


def cmd_report(bench) -> int:
    for ds, md in bench.report().items():
        print(f"\n## {ds} ({bench.cfg.preset} preset)\n")
        print(md)
    log.info("tables, plots and README written under %s", bench.layout.results_root)
    return 0


def run_bench(bench) -> int:
    """All stages in order, with the wall time of each."""
    from benchmark.registry import get_method

    times: dict[str, float] = {}

    def timed(stage, fn, *a):
        t0 = time.perf_counter()
        out = fn(*a)
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t0
        return out

    classes = [get_method(m) for m in bench.cfg.grid.methods]
    needs_experts = any(c.needs_experts for c in classes)
    needs_shortcuts = any(getattr(c, "needs_shortcuts", False) for c in classes)
    for ds in bench.cfg.datasets:
        timed("fetch", bench.fetch, ds)
        timed("embed", bench.embed, ds)
        if needs_experts:
            timed("experts", bench.experts, ds)
        if needs_shortcuts:
            timed("shortcut", bench.shortcut, ds)
    for cell in bench.cells():
        timed("distill", bench.distill, *cell)
    for cell in bench.cells():
        timed("evaluate", bench.evaluate, *cell)
    for ds in bench.cfg.datasets:
        timed("full-data", bench.full_data, ds)
    timed("report", cmd_report, bench)
    print("\n| stage | seconds |\n|---|---|")
    for stage, sec in times.items():
        print(f"| {stage} | {sec:.1f} |")
    print(f"| total | {sum(times.values()):.1f} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    try:
        if args.command == "methods":
            return cmd_methods(args)
        from benchmark.entries import ENTRY_COMMANDS, run_entry_command

        if args.command in ENTRY_COMMANDS:
            return run_entry_command(args)
        if args.command == "init-params":
            from benchmark.params import write_params

            log.info("wrote %s", write_params(args.preset, args.out, args.overrides))
            return 0
        if args.command == "ui":
            from benchmark.tracking import serve_ui, tracking_uri

            return serve_ui(tracking_uri(Path(args.results_root).resolve()), args.host, args.port)
        if args.command == "sweep":
            from benchmark.sweep import run_sweep_command

            return run_sweep_command(args)
        bench = _bench(args)
        if args.command == "fetch":
            for ds in bench.cfg.datasets:
                bench.fetch(ds)
        elif args.command == "embed":
            for ds in bench.cfg.datasets:
                bench.embed(ds)
        elif args.command == "experts":
            for ds in bench.cfg.datasets:
                bench.experts(ds, args.index)
        elif args.command == "shortcut":
            for ds in bench.cfg.datasets:
                bench.shortcut(ds)
        elif args.command == "full-data":
            for ds in bench.cfg.datasets:
                r = bench.full_data(ds)["protocols"]["strict"]["r_mean"]
                log.info("%s full data: r_mean %.2f ± %.2f", ds, r["mean"], r["std"])
        elif args.command == "distill":
            for cell in _cells(bench, args):
                bench.distill(*cell, force=args.force, runner=args.runner)
        elif args.command == "run-method":
            ds = bench.cfg.datasets[0]
            bench.run_method(ds, args.method, args.budget, args.seed, Path(args.work_dir))
        elif args.command == "evaluate":
            for cell in _cells(bench, args):
                res = bench.evaluate(*cell, force=args.force)
                for proto, summary in res["protocols"].items():
                    log.info("%s %s b=%d s=%d %s: r_mean %.2f ± %.2f", *cell, proto, summary["r_mean"]["mean"],
                             summary["r_mean"]["std"])
        elif args.command == "report":
            return cmd_report(bench)
        elif args.command == "bench":
            return run_bench(bench)
        return 0
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, FloatingPointError) as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
