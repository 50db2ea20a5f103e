"""``mmdd``: the command-line front end. Each stage command runs one stage function of :mod:`benchmark.stages` on
the configuration in ``params.yaml`` (written by ``mmdd init-params``); ``dvc.yaml`` calls exactly these commands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from benchmark import argtypes

log = logging.getLogger("mmdd")
INPUT_ERRORS = (ValueError, FileNotFoundError, RuntimeError, KeyError, FloatingPointError)


class MmddParser(argparse.ArgumentParser):
    """A parser whose usage errors are one line (what is wrong, where to look) and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml",
                   help="the resolved configuration, written by `mmdd init-params` [params.yaml]")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value for this run only, e.g. -S eval.students=5 (repeatable)")
    p.add_argument("--dataset", action="append", default=None, help="restrict to this dataset (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1; checked before anything "
                   "runs [cpu]")
    p.add_argument("--data-root", default=None, help="root of data/ (raw, features, experts) [params data.root]")
    p.add_argument("--results-root", default="results", help="root of results/ [results]")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress: neither bars (terminal) nor periodic progress lines (logs, every "
                        "$MMDD_PROGRESS_INTERVAL s [30])")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _cell_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", action="append", default=None, help="method name (repeatable) [grid.methods]")
    p.add_argument("--budget", type=argtypes.budget, action="append", default=None,
                   help="pairs, >= 1 (repeatable) [grid.budgets]")
    p.add_argument("--seed", type=argtypes.seed, action="append", default=None, help="seed, >= 0 (repeatable) "
                   "[grid.seeds]")
    p.add_argument("--force", action="store_true", help="recompute even when the output is up to date")


def check_device(device: str | None) -> None:
    """Fail now, naming the fix, for a device this machine lacks (not minutes later in another stage)."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no CUDA GPU here (torch.cuda.is_available() is False): "
                             "use --device cpu, or run on a machine with a GPU and a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s): use "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available on this machine: use --device cpu")


def _context(args):
    from benchmark.stages.context import make_context

    check_device(args.device)
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

    return serve_ui(tracking_uri(Path(args.results_root).resolve()), args.host, args.port, args.timeout,
                    _experiment_prefix(Path(args.results_root).resolve().parent / "params.yaml"))


def _experiment_prefix(params: Path) -> str:
    """params.yaml's tracking.experiment_prefix (``mmdd`` when absent)."""
    import yaml

    doc = yaml.safe_load(params.read_text()) if params.is_file() else None
    return str(((doc or {}).get("tracking") or {}).get("experiment_prefix") or "mmdd")


def cmd_status(args) -> int:
    from benchmark.status import pipeline_status, render

    status = pipeline_status(args.project)
    if args.json:
        import json

        print(json.dumps(status.to_json(), indent=2))
    else:
        print(render(status))
    return 0


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
                if (rec := _recorder(ctx)) is not None:
                    rec.references(ds)
            else:
                fn(ctx, ds)
        return 0

    return run


def _recorder(ctx):
    """The MLflow recorder of this configuration; None when tracking is off."""
    if not ctx.cfg.tracking.enabled:
        return None
    from benchmark.tracking.recorder import Recorder

    return Recorder(ctx)


def cmd_distill(args) -> int:
    from benchmark.stages.distill import cell_inputs, distill, is_current

    ctx = _context(args)
    rec = _recorder(ctx)
    for cell in _cells(ctx, args):
        if rec is None or (not args.force and is_current(ctx.cell_dir(cell), cell_inputs(ctx, cell)[3])):
            distill(ctx, cell, force=args.force, runner=args.runner)
            continue
        with rec.distilling(cell):  # the seed run is open (with live curves) while the method runs
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
    rec = _recorder(ctx)
    for cell in _cells(ctx, args):
        res = evaluate(ctx, cell, force=args.force, students=args.students)
        for proto, summary in res["protocols"].items():
            log.info("%s %s: r_mean %.2f ± %.2f", cell, proto, summary["r_mean"]["mean"], summary["r_mean"]["std"])
        if rec is not None:
            record_run_id(ctx.cell_dir(cell), rec.evaluated(cell))
    return 0


def record_run_id(cell_dir: Path, run_id: str | None) -> None:
    """The cell's MLflow run id beside its evaluation's measurements (None: not recorded)."""
    from benchmark.io import read_json, write_json

    path = cell_dir / "evaluate.volatile.json"
    write_json(path, {**(read_json(path) if path.exists() else {}), "mlflow_run_id": run_id})


def cmd_record(args) -> int:
    ctx = _context(args)
    rec = _recorder(ctx)
    if rec is None:
        raise ValueError("tracking.enabled is false in params.yaml: set -S tracking.enabled=true to record")
    n = rec.sync()
    if n is None:
        return 1
    log.info("recorded %d evaluated cell(s) and the reference rows of %s", n, ", ".join(ctx.cfg.datasets))
    return 0


def cmd_tune(args) -> int:
    import yaml

    from benchmark.stages.tune import tune

    ctx = _context(args)
    values = [yaml.safe_load(v) for v in args.values.split(",")]
    for ds in ctx.cfg.datasets:
        rec = tune(ctx, args.method, ds, args.budget or ctx.cfg.grid.budgets[0], args.param, values,
                   args.seed or [1000])
        print(f"{ds}: {args.method} {args.param} = {rec['params'][args.param]['chosen']!r} (chosen on val)")
    return 0


def cmd_cross_arch(args) -> int:
    from benchmark.stages.cross_arch import cross_arch, cross_methods

    ctx = _context(args)
    rec = _recorder(ctx)
    wanted = cross_methods(ctx.cfg)
    for cell in _cells(ctx, args):
        if args.method is None and cell.method not in wanted:
            continue
        res = cross_arch(ctx, cell, force=args.force)
        for tower, r in res["towers"].items():
            s = r["protocols"]["strict"]["r_mean"]
            log.info("%s on %s: r_mean %.2f ± %.2f", cell, tower, s["mean"], s["std"])
        if rec is not None:
            rec.cross_arched(cell)
    return 0


def cmd_report(args) -> int:
    from benchmark.stages.report import report

    ctx = _context(args)
    if (rec := _recorder(ctx)) is not None:
        rec.sync()  # every row current in MLflow, cached cells and references included
    for ds, md in report(ctx).items():
        print(f"\n## {ds} ({ctx.cfg.preset} preset)\n")
        print(md)
    log.info("tables, plots and README written under %s", ctx.layout.results_root)
    return 0


def cmd_bench(args) -> int:
    """Every stale stage of dvc.yaml, in order, through the sweep's local executor; recorded with DVC."""
    from benchmark.sweep import run_sweep_command

    check_device(args.device)
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


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmdd-bench")
    except PackageNotFoundError:  # a source tree that was never installed
        from benchmark import __version__

        return f"{__version__} (not installed)"


def _add(sub, name: str, text: str, description: str | None = None) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=text, description=description or text[0].upper() + text[1:] + ".")


def _add_info_commands(sub) -> None:
    p = _add(sub, "methods", "list the registered methods with a one-line description",
             "List every registered method (in-tree and installed plug-ins of the mmdd.methods entry point) with the "
             "first line of its docstring.")
    p.set_defaults(func=cmd_methods)
    p = _add(sub, "init-params", "write params.yaml and dvc.yaml from a preset",
             "Resolve a preset (every method's parameters for every dataset and budget) into params.yaml, and render "
             "the matching dvc.yaml.")
    p.add_argument("--preset", default="default",
                   help="preset name (default, smoke, paper, tiny) or a YAML path [default]")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset value, e.g. -S grid.seeds=[0,1] (repeatable)")
    p.add_argument("--out", default="params.yaml", help="output path [params.yaml]")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="where to render the pipeline [dvc.yaml]")
    p.add_argument("--no-dvc-yaml", action="store_true", help="write params.yaml only")
    p.set_defaults(func=cmd_init_params)
    p = _add(sub, "ui", "serve the MLflow UI on the benchmark's tracking store",
             "Serve the MLflow UI on the benchmark's tracking store ($MLFLOW_TRACKING_URI, else the project's "
             "mlflow.db) until Ctrl-C. Exits non-zero when the server cannot start; stops every server process on "
             "exit.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                   "[127.0.0.1]")
    p.add_argument("--port", type=argtypes.port, default=5000, help="port to listen on; 0 picks a free one [5000]")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer [120]")
    p.add_argument("--results-root", default="results", help="results/ of the project whose store to open "
                   "[results]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_ui)
    p = _add(sub, "status", "count the pipeline's done, stale and remaining stages, with an ETA",
             "Count the stages of dvc.yaml per kind (distill, evaluate, ...): done, stale (ran before, changed "
             "since) and remaining (never ran), from one `dvc status`; the ETA sums the measured times "
             "(*.volatile.json) of the same or sibling cells.")
    p.add_argument("--project", default=".", help="project directory (holding dvc.yaml) [.]")
    p.add_argument("--json", action="store_true", help="print the counts, ETA and every stage as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_status)


def _add_stage_commands(sub) -> None:
    for name, text in STAGE_HELP.items():
        p = _add(sub, name, text)
        _common(p)
        if name == "experts":
            p.add_argument("--index", type=argtypes.non_negative_int, action="append", default=None,
                           help="train only these expert indices (for parallel workers)")
        if name == "prepare":
            p.add_argument("--method", action="append", default=None, help="method (repeatable) [grid.methods]")
        p.set_defaults(func=cmd_report if name == "report" else per_dataset(name.replace("-", "_")))
    p = _add(sub, "run-method", "run one method for one cell and write its raw DistilledSet to --work-dir",
             "Run one method for one cell and write its raw DistilledSet to --work-dir, without validation or "
             "evaluation: what a container runner executes.")
    _common(p)
    p.add_argument("--method", required=True, help="method name (see `mmdd methods`)")
    p.add_argument("--budget", type=argtypes.budget, required=True, help="pairs, >= 1")
    p.add_argument("--seed", type=argtypes.seed, required=True, help="seed, >= 0")
    p.add_argument("--work-dir", required=True, help="output directory (the only writable path in a container)")
    p.set_defaults(func=cmd_run_method)
    p = _add(sub, "distill", "distil grid cells (method x budget x seed)")
    _common(p)
    _cell_args(p)
    p.add_argument("--runner", default=os.environ.get("MMDD_RUNNER", "local"),
                   help="where the method runs: local (this process) or docker (an isolated container; the "
                        "harness validates its output) [$MMDD_RUNNER or local]")
    p.set_defaults(func=cmd_distill)
    p = _add(sub, "evaluate", "evaluate distilled sets with fresh students on the test split")
    _common(p)
    _cell_args(p)
    p.add_argument("--students", choices=["auto", "batched", "sequential"], default="auto",
                   help="train a cell's evaluation students one by one or as one vectorised model (equal up to "
                        "rounding); auto: batched on CUDA, one by one on the CPU, where batching is slower [auto]")
    p.set_defaults(func=cmd_evaluate)
    p = _add(sub, "record", "record every result on disk in MLflow (what is missing there)",
             "Record in MLflow every evaluated cell and reference row of the grid that the store lacks (cells "
             "computed with tracking off, or restored by DVC), and refresh each row's aggregate over its seeds. "
             "The stages record as they run; this is the catch-up.")
    _common(p)
    p.set_defaults(func=cmd_record)
    p = _add(sub, "tune", "choose one method parameter on the val split and record how",
             "Distil a cell once per candidate value (tuning seeds, never grid seeds), score each set's evaluation "
             "students on val (never test), and record every candidate and the chosen value under "
             "results/tuning/<preset>/<dataset>/<method>.json; then put the value in the preset's methods: section.")
    _common(p)
    p.add_argument("--method", required=True, help="method name (a variant too), as in grid.methods")
    p.add_argument("--param", required=True,
                   help="parameter name; comma-separated names share each value, e.g. lr_img,lr_txt")
    p.add_argument("--values", required=True, help="candidate values, comma-separated YAML, e.g. 100,300,1000")
    p.add_argument("--budget", type=argtypes.budget, default=None, help="pairs [the grid's first budget]")
    p.add_argument("--seed", type=argtypes.seed, action="append", default=None,
                   help="tuning seed, outside grid.seeds (repeatable) [1000]")
    p.set_defaults(func=cmd_tune)
    p = _add(sub, "cross-arch", "evaluate distilled sets on students with other image towers (cross_arch.towers)",
             "Train cross_arch.students fresh students per tower of cross_arch.towers on each cell's distilled set "
             "and test them (strict protocol); writes cross_arch.json per cell "
             "(docs/protocols.md#cross-architecture-evaluation).")
    _common(p)
    _cell_args(p)
    p.set_defaults(func=cmd_cross_arch)
    p = _add(sub, "bench", "bring every stage of dvc.yaml up to date, in order (recorded with DVC)",
             "Run the stale stages of dvc.yaml through the local executor of `mmdd sweep`.")
    p.add_argument("-j", "--jobs", type=argtypes.positive_int, default=1, help="stages at a time [1]")
    p.add_argument("--device", default=None, help="--device for the tensor stages, e.g. cuda [as dvc.yaml]")
    p.add_argument("--project", default=".", help="project directory [.]")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    """Every ``mmdd`` command; imports no torch (stage modules are imported by the command that runs)."""
    from benchmark.entries import add_entry_commands
    from benchmark.sweep import add_sweep_command

    parser = MmddParser(prog="mmdd", description="mmdd-bench: multimodal dataset distillation benchmark")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="print the installed version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info_commands(sub)
    _add_stage_commands(sub)
    add_entry_commands(sub)
    add_sweep_command(sub).set_defaults(func=_sweep)
    return parser


def _sweep(args) -> int:
    from benchmark.sweep import run_sweep_command

    if args.runner == "local":
        check_device(args.device)
    return run_sweep_command(args)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _setup_progress(args) -> None:
    """Progress on unless --no-progress; off a terminal, tqdm bars of other modules redraw at the log interval."""
    from benchmark import progress

    settings = progress.configure(enabled=not getattr(args, "no_progress", False))
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", str(settings.interval_s))


def _run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "verbose", False))
    func = getattr(args, "func", None)
    try:
        _setup_progress(args)
        if func is None:  # entry commands dispatch themselves
            from benchmark.entries import run_entry_command

            return run_entry_command(args)
        return func(args)
    except INPUT_ERRORS as exc:
        log.error("%s", exc)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Run one ``mmdd`` command: 0 on success, 2 on bad input (one line, no traceback), 130 on Ctrl-C."""
    try:
        return _run(argv)
    except KeyboardInterrupt:
        sys.stderr.write("mmdd: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
