"""The container runner, end to end with a real Docker engine and the CPU test image (no mocks).

A method runs in a container on the tiny preset; the harness validates and evaluates its output. The sandbox is
checked from inside with the exact spec a method run gets: no network (only ``lo``), only train inputs, read-only
data, source and root file system, one writable output directory, the caller's uid, resource limits. Hostile
entries reproduce each attack on the harness (reading the test split, planting links in the output directory,
flooding it, asking evaluation for 10**12 epochs, never ending) and must now fail, naming the rule. The last tests
check the host-side pieces (input views, output acceptance, limits) without Docker.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from benchmark.cli import main
from benchmark.distilled import DistilledSet
from benchmark.io import read_json
from benchmark.paths import Layout
from benchmark.stages.cells import Cell
from benchmark.stages.distill import run_method
from benchmark.runners import get_runner
from benchmark.runners.docker import HOST_SITE, DockerRunner, orphans
from benchmark.runners.images import docker
from benchmark.runners.spec import CellSpec, SandboxLimits, config_document
from tests.docker_env import cell_spec, cpu_test_image
from tests.helpers import private_registry, tiny_context, tiny_params

CELL = Path("cells/tiny/shapes/random/b10/s0")
PROBE = r"""
import json, os, socket
res = {"interfaces": sorted(os.listdir("/sys/class/net")), "uid": os.getuid(), "gid": os.getgid(), "writes": {}}
for path in ["/out/probe", "/data/raw/shapes/probe", "/data/features/shapes/probe", "/probe", "/etc/probe",
             HOST_SITE + "/probe", SOURCE + "/probe"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        res["writes"][path] = "ok"
    except OSError as exc:
        res["writes"][path] = exc.strerror
for key, call in (("connect", lambda: socket.create_connection(("1.1.1.1", 443), timeout=3)),
                  ("dns", lambda: socket.getaddrinfo("pypi.org", 443))):
    try:
        call()
        res[key] = "ok"
    except OSError as exc:
        res[key] = str(exc)
print(json.dumps(res))
"""


@pytest.fixture(scope="module")
def image():
    tag = cpu_test_image()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MMDD_DOCKER_IMAGE", tag)
        yield tag


def _args(tiny_project, results: Path) -> list[str]:
    root, _ = tiny_project
    return ["--params", str(root / "params.yaml"), "--data-root", str(root / "data"), "--results-root", str(results),
            "--no-progress"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_method_runs_in_container_and_the_harness_evaluates_it(tiny_project, image, tmp_path, monkeypatch):
    root, _ = tiny_project
    results = tmp_path / "docker"
    cell_args = ["--method", "random", "--budget", "10", "--seed", "0"]
    data_before = _snapshot(root / "data")
    # the harness records the run around the container (outside results/, so the listing below is the cell's)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)

    assert main(["distill", *_args(tiny_project, results), *cell_args, "--runner", "docker"]) == 0

    assert _snapshot(root / "data") == data_before, "the container wrote into data/"
    written = {p.relative_to(results) for p in results.rglob("*") if p.is_file()}
    assert written - {CELL / "distill_log.jsonl"} == {CELL / "distilled.json", CELL / "distilled.safetensors",
                                                       CELL / "distill.volatile.json"}
    assert not (results / CELL / ".container").exists()
    from mlflow import MlflowClient

    (run,) = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("mmdd/tiny/shapes").experiment_id], "tags.`mmdd.level` = 'seed'")
    assert run.info.run_name == "random/b10/s0" and run.info.status == "FINISHED"
    assert all(p.stat().st_uid == os.getuid() for p in results.rglob("*"))
    info = read_json(results / CELL / "distill.volatile.json")  # where and how long: kept out of the hashed set
    assert info["runner"] == "docker" and info["pairs"] == 10 and info["container_image"] == image
    meta = json.loads((results / CELL / "distilled.json").read_text())["meta"]
    assert "container_image" not in meta and "runner" not in meta

    # The container computed exactly what the in-process runner computes.
    local = tmp_path / "local"
    assert main(["distill", *_args(tiny_project, local), *cell_args]) == 0
    a, b = DistilledSet.load(results / CELL / "distilled"), DistilledSet.load(local / CELL / "distilled")
    assert torch.equal(a.phases[0].images, b.phases[0].images) and torch.equal(a.phases[0].texts, b.phases[0].texts)

    # Evaluation is the harness's: fresh students trained on the container's set, scored on the test split.
    assert main(["evaluate", *_args(tiny_project, results), *cell_args, "-S", "tracking.enabled=false"]) == 0
    metrics = read_json(results / CELL / "metrics.json")
    assert metrics["pairs"] == 10 and metrics["method"] == "random"
    r_means = [m["mean"] for k, m in _items(metrics) if k == "r_mean"]
    assert r_means and all(0.0 <= r <= 100.0 for r in r_means)


def test_repblend_runs_in_container_with_its_prepared_head_experts(tiny_project, image, tmp_path):
    """RepBlend reads a prepared artifact built from the training data (head-only experts over a frozen encoder):
    in the container it sees that artifact read-only and computes exactly what the in-process runner computes."""
    from tests.helpers import stage_args

    shutil.copytree(tiny_project[0] / "data", tmp_path / "data")
    tiny_params(tmp_path, ["grid.methods=[repblend]", "grid.budgets=[10]", "grid.seeds=[0]"])
    off = ["-S", "tracking.enabled=false"]
    assert main(["prepare", *stage_args(tmp_path), *off, "--method", "repblend"]) == 0
    prepared = tmp_path / "data" / "prepared"
    before = _snapshot(prepared)
    cell_args = ["--method", "repblend", "--budget", "10", "--seed", "0", *off]
    docker_out, local_out = tmp_path / "docker", tmp_path / "local"
    assert main(["distill", *stage_args(tmp_path, results=docker_out), *cell_args, "--runner", "docker"]) == 0
    assert _snapshot(prepared) == before, "the container wrote into the prepared artifacts"
    assert main(["distill", *stage_args(tmp_path, results=local_out), *cell_args]) == 0
    cell = Path("cells/tiny/shapes/repblend/b10/s0")
    assert read_json(docker_out / cell / "distill.volatile.json")["runner"] == "docker"
    a, b = DistilledSet.load(docker_out / cell / "distilled"), DistilledSet.load(local_out / cell / "distilled")
    assert a.meta["teacher"][0]["kind"] == "head-experts"
    assert torch.equal(a.phases[0].images, b.phases[0].images) and torch.equal(a.phases[0].texts, b.phases[0].texts)


def _items(doc):
    """Every (key, value) pair of a nested JSON document (the metrics layout may nest protocols)."""
    for key, value in doc.items():
        yield key, value
        if isinstance(value, dict):
            yield from _items(value)


def test_sandbox_has_no_network_and_only_the_output_dir_is_writable(tiny_project, image, tmp_path):
    root, _ = tiny_project
    bench = tiny_context(root, results=tmp_path / "results")
    source = str(Path(__import__("benchmark").__file__).resolve().parent)
    script = PROBE.replace("HOST_SITE", repr(HOST_SITE)).replace("SOURCE", repr(source))
    out = tmp_path / "out"
    run = DockerRunner.from_env().probe(cell_spec(bench, "random", tmp_path / "cell"), script, out)
    assert run.rc == 0, run.tail
    res = json.loads(run.tail[-1])
    assert res["interfaces"] == ["lo"]
    assert res["connect"] != "ok" and res["dns"] != "ok"
    assert (res["uid"], res["gid"]) == (os.getuid(), os.getgid())
    writes = res["writes"]
    assert writes.pop("/out/probe") == "ok"
    assert set(writes.values()) == {"Read-only file system"}, writes
    assert (out / "probe").read_text() == "x" and (out / "probe").stat().st_uid == os.getuid()
    assert not (root / "data" / "raw" / "shapes" / "probe").exists()


def test_invalid_container_output_is_refused_and_leaves_no_set(tiny_project, image, tmp_path, caplog):
    results = tmp_path / "results"
    args = [*_args(tiny_project, results), "-S", "methods.random.shapes.b10.lr_img=.nan"]
    assert main(["distill", *args, "--method", "random", "--budget", "10", "--seed", "0", "--runner", "docker"]) == 2
    assert "rule 'finite'" in caplog.text and "lr_img" in caplog.text
    assert not list(results.rglob("distilled*")) and not list(results.rglob(".container"))


def test_method_missing_its_requirements_is_refused_before_the_container_starts(tiny_project, image, tmp_path,
                                                                               caplog):
    root, _ = tiny_project
    data = tmp_path / "data"
    shutil.copytree(root / "data", data, ignore=shutil.ignore_patterns("experts"))
    results = tmp_path / "results"
    args = ["--params", str(root / "params.yaml"), "--data-root", str(data), "--results-root", str(results),
            "--no-progress"]
    assert main(["distill", *args, "--method", "herding", "--budget", "10", "--seed", "0", "--runner", "docker"]) == 2
    assert "mmdd experts" in caplog.text and "failed in container" not in caplog.text
    assert not list(results.rglob("distilled*"))
    assert isinstance(get_runner("docker"), DockerRunner)


def test_method_failing_in_the_container_reports_its_output(tiny_project, hostile, tmp_path, caplog):
    root, _ = tiny_project
    results = tmp_path / "results"
    assert _distill(root / "data", results, "hostile-crash", params=hostile["params"]) == 2
    assert "failed in container" in caplog.text and "(exit 2)" in caplog.text
    assert "boom from inside the container" in caplog.text  # the container's own error, relayed
    assert not list(results.rglob("distilled*"))


def test_configuration_round_trips_into_the_container(tiny_project, tmp_path):
    root, _ = tiny_project
    bench = tiny_context(root, ["eval.students=3", "methods.random.lr_img=0.25"], results=tmp_path)
    doc = config_document(bench.cfg, bench.student.tower_config)
    assert doc["eval"]["students"] == 3 and doc["methods"]["random"]["shapes"]["b10"]["lr_img"] == 0.25
    assert doc["student"]["tower_config"] == bench.student.tower_config


def test_entry_dockerfile_is_built_once_and_used(tiny_project, image, tmp_path, monkeypatch):
    from benchmark import registry
    from benchmark.runners import images
    from methods.coresets.random import RandomCoreset

    marker = uuid.uuid4().hex
    context = tmp_path / "entry"
    context.mkdir()
    (context / "Dockerfile").write_text("ARG BASE_IMAGE\nFROM ${BASE_IMAGE}\nUSER root\n"
                                        f"RUN echo {marker} > /opt/mmdd/entry-marker\nUSER 1000\n")
    monkeypatch.setattr(registry, "_REGISTRY", private_registry())
    cls = registry.register_method("docker-entry")(
        type("DockerEntry", (RandomCoreset,), {"dockerfile": str(context / "Dockerfile")}))
    calls: list[str] = []
    real = images.docker
    monkeypatch.setattr(images, "docker", lambda *a, **k: calls.append(a[0]) or real(*a, **k))  # counts, then runs

    runner = DockerRunner.from_env()
    first = runner.image_for(cls)
    try:
        second = runner.image_for(cls)
        assert first.id == second.id and calls.count("build") == 1, "an unchanged entry must not be rebuilt"
        assert first.ref.startswith("mmdd-entry-docker-entry:0.1.0-") and first.python_env == "host"
        root, _ = tiny_project
        bench = tiny_context(root, results=tmp_path / "results")
        run = runner.probe(cell_spec(bench, "docker-entry", tmp_path / "cell"),
                           "print(open('/opt/mmdd/entry-marker').read().strip())", tmp_path / "out")
        assert run.rc == 0 and run.tail[-1] == marker
    finally:
        real("rmi", "-f", first.ref, check=False)


# ------------------------------------------------------------------------------------------ hostile entries
# Each attack is a real method entry (an out-of-tree module the runner mounts and registers in the container) run
# through `mmdd distill --runner docker`; the constants it needs (host paths) are written into its source.
HOSTILE = r'''
"""Hostile method entries for the container runner's tests (written by tests/test_container_runner.py)."""
import atexit
import os
import time

import torch

from benchmark.distilled import DistilledSet, Phase
from benchmark.interface import Method

SECRETS = __SECRETS__  # every val/test path of the dataset, as the container would see it
VICTIM = __VICTIM__  # output name -> host path of another cell's file


class _Base(Method):
    defaults = {"tiny": {}}

    def distill(self, task):
        x, t = task.train.pairs(torch.arange(task.budget))
        return DistilledSet([Phase(images=x.float().clone(), texts=t.float().clone(), lr_img=0.1, lr_txt=0.1)],
                            self.meta())

    def meta(self):
        return {"loss": "ce"}


class Peeker(_Base):
    """Reads every val/test path it can and lists everything under /data."""

    def meta(self):
        found = []
        for path in SECRETS:
            try:
                with open(path, "rb") as f:
                    f.read(1)
                found.append(path)
            except OSError:
                pass
        visible = sorted(os.path.join(d, n) for d, _, names in os.walk("/data") for n in names)
        return {"loss": "ce", "found": found, "visible": visible}


class SymlinkPlanter(_Base):
    """Once the harness code inside the container has saved the set, replaces the outputs by links to host files."""

    def distill(self, task):
        def plant():
            for name, target in VICTIM.items():
                path = os.path.join("/out", name)
                if os.path.lexists(path):
                    os.unlink(path)
                os.symlink(target, path)

        atexit.register(plant)
        return super().distill(task)


class HardLinker(_Base):
    def distill(self, task):
        atexit.register(lambda: os.link("/out/distilled.safetensors", "/out/second-name"))
        return super().distill(task)


class OutFlooder(_Base):
    """Writes 1 GiB to /out in 16 MiB files (under the per-file size limit)."""

    def distill(self, task):
        chunk = b"x" * (1 << 20)
        for k in range(64):
            with open(f"/out/flood_{k:02d}", "wb") as f:
                for _ in range(16):
                    f.write(chunk)
            print(f"wrote {16 * (k + 1)} MiB", flush=True)
        return super().distill(task)


class EpochBomb(_Base):
    def distill(self, task):
        dset = super().distill(task)
        dset.phases[0].epochs = 10**12
        return dset


class Crasher(_Base):
    def distill(self, task):
        raise RuntimeError("boom from inside the container")


class Sleeper(_Base):
    def distill(self, task):
        print("sleeping", flush=True)
        while True:
            time.sleep(1)
'''
ENTRIES = {"hostile-peeker": "Peeker", "hostile-symlink": "SymlinkPlanter", "hostile-hardlink": "HardLinker",
           "hostile-flood": "OutFlooder", "hostile-epochs": "EpochBomb", "hostile-sleeper": "Sleeper",
           "hostile-crash": "Crasher"}
RAW = Path("raw/shapes")
FEATURES = Path("features/shapes/minilm")


def _secret_paths(data: Path) -> list[str]:
    """Every val/test file (and the generator manifest) of a data root, at its container path."""
    names = [RAW / "manifest.json", FEATURES / "val.safetensors", FEATURES / "test.safetensors"]
    names += [RAW / "annotations" / f"shapes_{s}.json" for s in ("val", "test")]
    for split in ("val", "test"):
        names += [RAW / "images" / split / p.name for p in (data / RAW / "images" / split).iterdir()]
        names += [RAW / "images" / "all" / f"{split}_{p.name}" for p in (data / RAW / "images" / split).iterdir()]
    return sorted(f"/data/{n.as_posix()}" for n in names)


@pytest.fixture(scope="module")
def hostile(tiny_project, image, tmp_path_factory):
    """The hostile entries, registered here and (through an ``mmdd.methods`` entry point) for child processes;
    plus a victim cell whose files the symlink entry points at."""
    from benchmark import registry

    root, _ = tiny_project
    base = tmp_path_factory.mktemp("hostile")
    victim = base / "victim"
    victim.mkdir()
    DistilledSet([_real_phase(root)], {"loss": "ce", "victim": True}).save(victim / "distilled")
    (victim / "distill_log.jsonl").write_text('{"victim": 1}\n')
    site = base / "site"
    site.mkdir()
    source = HOSTILE.replace("__SECRETS__", repr(_secret_paths(root / "data"))).replace(
        "__VICTIM__", repr({n: str(victim / n) for n in ("distilled.safetensors", "distilled.json",
                                                          "distill_log.jsonl")}))
    (site / "mmdd_hostile.py").write_text(source)
    dist = site / "mmdd_hostile-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mmdd-hostile\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mmdd.methods]\n" + "".join(
        f"{name} = mmdd_hostile:{cls}\n" for name, cls in ENTRIES.items()))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(registry, "_REGISTRY", private_registry())
        mp.syspath_prepend(str(site))
        import mmdd_hostile

        for name, cls in ENTRIES.items():
            registry.register_method(name)(getattr(mmdd_hostile, cls))
        params = tiny_params(base, [f"grid.methods=[random,{','.join(ENTRIES)}]", "grid.budgets=[10]",
                                    "grid.seeds=[0]"])
        yield {"victim": victim, "site": site, "params": params}
    sys.modules.pop("mmdd_hostile", None)


def _real_phase(root: Path):
    from benchmark.distilled import Phase

    bench = tiny_context(root, results=root / "unused")
    x, t = bench.train_data("shapes").pairs(torch.arange(10, 20))
    return Phase(images=x.float().clone(), texts=t.float().clone(), lr_img=0.1, lr_txt=0.1)


def _distill(data: Path, results: Path, method: str, *extra: str, params: Path) -> int:
    return main(["distill", "--params", str(params), "--data-root", str(data), "--results-root", str(results),
                 "--no-progress", "--method", method, "--budget", "10", "--seed", "0", "--runner", "docker", *extra])


def _cell(results: Path, method: str) -> Path:
    return results / "cells/tiny/shapes" / method / "b10/s0"


def _merged_images(src: Path, dst: Path) -> Path:
    """A copy of a data root whose images all sit in one directory (Flickr30k's layout): images/all/<split>_<name>."""
    shutil.copytree(src, dst)
    images = dst / RAW / "images"
    (images / "all").mkdir()
    for split in ("train", "val", "test"):
        for p in (images / split).iterdir():
            p.rename(images / "all" / f"{split}_{p.name}")
        (images / split).rmdir()
        ann = dst / RAW / "annotations" / f"shapes_{split}.json"
        entries = json.loads(ann.read_text())
        for e in entries:
            e["image"] = f"images/all/{split}_{Path(e['image']).name}"
        ann.write_text(json.dumps(entries))
    return dst


@pytest.mark.parametrize("layout", ["split-dirs", "merged"])
def test_method_sees_only_train_inputs(tiny_project, hostile, tmp_path, layout):
    root, _ = tiny_project
    data = root / "data" if layout == "split-dirs" else _merged_images(root / "data", tmp_path / "data")
    results = tmp_path / "results"

    # `mmdd run-method` works on the train-only mounts
    assert _distill(data, results, "hostile-peeker", params=hostile["params"]) == 0

    meta = json.loads((_cell(results, "hostile-peeker") / "distilled.json").read_text())["meta"]
    assert meta["found"] == [], "the method could read val/test files"
    train_images = sorted(e["image"] for e in json.loads((data / RAW / "annotations/shapes_train.json").read_text()))
    expected = {f"/data/{RAW.as_posix()}/annotations/shapes_train.json",
                f"/data/{FEATURES.as_posix()}/train.safetensors"}
    expected |= {f"/data/{RAW.as_posix()}/{p}" for p in train_images}
    expected |= {f"/data/{p.relative_to(data).as_posix()}" for p in (data / "experts").rglob("*") if p.is_file()}
    assert set(meta["visible"]) == expected
    if layout == "merged":
        assert (data / "views" / "shapes").is_dir()


def test_symlinked_outputs_are_refused_and_nothing_is_moved(tiny_project, hostile, tmp_path, caplog):
    root, _ = tiny_project
    victim = hostile["victim"]
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    results = tmp_path / "results"

    assert _distill(root / "data", results, "hostile-symlink", params=hostile["params"]) == 2

    assert "rule 'regular-file'" in caplog.text and "symbolic link" in caplog.text
    cell = _cell(results, "hostile-symlink")
    assert not list(cell.glob("distilled*")) and not (cell / "distill_info.json").exists()
    assert not (cell / "distill_log.jsonl").is_symlink() and not (cell / "distill_log.jsonl").exists()
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before


def test_hard_linked_output_is_refused(tiny_project, hostile, tmp_path, caplog):
    root, _ = tiny_project
    assert _distill(root / "data", tmp_path / "results", "hostile-hardlink", params=hostile["params"]) == 2
    assert "rule 'regular-file'" in caplog.text and "2 hard links" in caplog.text
    assert not list((tmp_path / "results").rglob("distilled*"))


def test_epoch_bomb_is_refused_by_the_harness(tiny_project, hostile, tmp_path, caplog):
    root, _ = tiny_project
    assert _distill(root / "data", tmp_path / "results", "hostile-epochs", params=hostile["params"]) == 2
    assert "rule 'epochs': phase 0 epochs=1000000000000" in caplog.text
    assert not list((tmp_path / "results").rglob("distilled*"))


def test_flooding_out_is_stopped_at_the_cap(tiny_project, hostile, tmp_path, caplog, monkeypatch):
    root, _ = tiny_project
    monkeypatch.setenv("MMDD_DOCKER_OUT_MAX", "64m")
    monkeypatch.setenv("MMDD_DOCKER_POLL", "0.2")
    results = tmp_path / "results"

    assert _distill(root / "data", results, "hostile-flood", params=hostile["params"]) == 2

    assert "rule 'out-size'" in caplog.text
    written = [int(m) for m in re.findall(r"wrote (\d+) MiB", caplog.text)]
    assert max(written, default=0) < 1024, "the container wrote its whole GiB"
    assert not (_cell(results, "hostile-flood") / ".container").exists()


def test_tmp_and_pids_and_memory_are_limited(tiny_project, image, tmp_path):
    root, _ = tiny_project
    bench = tiny_context(root, results=tmp_path / "results")
    limits = SandboxLimits(tmp_bytes=64 << 20, pids_limit=32, memory_bytes=256 << 20)
    spec = cell_spec(bench, "random", tmp_path / "cell", limits=limits)
    runner = DockerRunner.from_env()
    script = r"""
import errno, json, threading, time
written, err = 0, None
try:
    with open("/tmp/flood", "wb") as f:
        for _ in range(1024):
            f.write(b"x" * (1 << 20)); f.flush(); written += 1 << 20
except OSError as exc:
    err = errno.errorcode[exc.errno]
threads = 0
try:
    for _ in range(1000):
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start(); threads += 1
except RuntimeError:
    pass
print(json.dumps({"written": written, "err": err, "threads": threads}))
"""
    run = runner.probe(spec, script, tmp_path / "out")
    assert run.rc == 0, run.tail
    res = json.loads(run.tail[-1])
    assert res["err"] == "ENOSPC" and res["written"] <= 64 << 20
    assert res["threads"] < 32

    hog = runner.probe(spec, "blocks = [bytearray(1 << 26) for _ in range(16)]\nprint('survived 1 GiB')",
                       tmp_path / "out")
    assert hog.oom_killed and hog.rc != 0 and "survived 1 GiB" not in hog.tail
    assert "rule 'memory'" in hog.failure(limits)


def _hostile_cli(tiny_project, results: Path, hostile) -> subprocess.Popen:
    root, _ = tiny_project
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(hostile["site"])]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "benchmark.cli", "distill", "--params", str(hostile["params"]), "--data-root",
           str(root / "data"),
           "--results-root", str(results), "--no-progress", "--method", "hostile-sleeper", "--budget", "10",
           "--seed", "0", "--runner", "docker"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cell_id(results: Path) -> str:
    return CellSpec(dataset="shapes", method="hostile-sleeper", budget=10, seed=0, device="cpu",
                    data_root=Path("/unused"), work_dir=_cell(results.resolve(), "hostile-sleeper"),
                    config_doc={"preset": "tiny"}).cell_id


def _wait_for_container(cell_id: str, proc: subprocess.Popen, timeout: float = 120) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = docker("ps", "-q", "--filter", f"label=mmdd.cell={cell_id}").stdout.split()
        if running:
            return running
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    raise AssertionError(f"no container of {cell_id} started within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_host_process_stops_the_container(tiny_project, hostile, tmp_path, sig):
    results = tmp_path / "results"
    cell_id = _cell_id(results)
    proc = _hostile_cli(tiny_project, results, hostile)
    try:
        _wait_for_container(cell_id, proc)
        time.sleep(1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert "Traceback" not in err and f"interrupted by {sig.name}" in err
    assert orphans(cell_id) == []


def test_killed_host_leaves_an_orphan_that_a_rerun_reaps_then_times_out(tiny_project, hostile, tmp_path, caplog,
                                                                       monkeypatch):
    results = tmp_path / "results"
    cell_id = _cell_id(results)
    proc = _hostile_cli(tiny_project, results, hostile)
    try:
        left = _wait_for_container(cell_id, proc)
    finally:
        proc.kill()  # SIGKILL: no cleanup possible
        proc.communicate()
    assert orphans(cell_id) == left  # the container outlived its host process

    monkeypatch.setenv("MMDD_DOCKER_TIMEOUT", "5")
    root, _ = tiny_project
    t0 = time.monotonic()
    assert _distill(root / "data", results, "hostile-sleeper", params=hostile["params"]) == 2
    elapsed = time.monotonic() - t0
    assert "removed 1 container(s) an earlier run" in caplog.text
    assert "rule 'timeout': killed after 5 s" in caplog.text and elapsed < 60
    assert orphans(cell_id) == []


# ------------------------------------------------------------------------------------------ host side, no Docker
def test_train_mounts_expose_only_train_files_through_a_view(tmp_path):
    """Flickr30k keeps every split's images in one directory: the mount is a view of hard links to the train ones."""
    from benchmark.runners.inputs import train_mounts

    data = tmp_path / "data"
    ds = data / "raw" / "flickr30k"
    (ds / "annotations").mkdir(parents=True)
    (ds / "flickr30k-images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        (ds / "flickr30k-images" / name).write_bytes(name.encode())
    train = [{"image": f"flickr30k-images/{n}", "caption": "x", "image_id": n} for n in ("a.jpg", "b.jpg")]
    (ds / "annotations" / "flickr30k_train.json").write_text(json.dumps(train))
    for split, names in (("val", ["c.jpg"]), ("test", ["d.jpg"])):
        (ds / "annotations" / f"flickr30k_{split}.json").write_text(
            json.dumps([{"image": f"flickr30k-images/{n}", "caption": ["x"]} for n in names]))
    feats = data / "features" / "flickr30k" / "minilm"
    feats.mkdir(parents=True)
    for split in ("train", "val", "test"):
        (feats / f"{split}.safetensors").write_bytes(b"f")
    layout = Layout(data, tmp_path / "results")

    mounts = dict((target, host) for host, target in train_mounts(layout, "flickr30k", "minilm", "tower"))

    assert set(mounts) == {"/data/raw/flickr30k/annotations/flickr30k_train.json",
                           "/data/features/flickr30k/minilm/train.safetensors", "/data/raw/flickr30k/flickr30k-images"}
    view = mounts["/data/raw/flickr30k/flickr30k-images"]
    assert view.is_relative_to(data / "views" / "flickr30k")
    assert sorted(p.name for p in view.iterdir()) == ["a.jpg", "b.jpg"]
    assert (view / "a.jpg").stat().st_ino == (ds / "flickr30k-images" / "a.jpg").stat().st_ino  # a hard link
    again = dict((t, h) for h, t in train_mounts(layout, "flickr30k", "minilm", "tower"))
    assert again == mounts and len(list((data / "views" / "flickr30k").iterdir())) == 1  # built once
    fresh = ds / "flickr30k-images" / "a.new"
    fresh.write_bytes(b"re-fetched")
    fresh.replace(ds / "flickr30k-images" / "a.jpg")
    (host, _), = [m for m in train_mounts(layout, "flickr30k", "minilm", "tower") if m[1].endswith("images")]
    assert host != view and (host / "a.jpg").read_bytes() == b"re-fetched"


def test_output_files_must_be_regular_singly_linked_and_small(tmp_path):
    from benchmark.runners.outputs import RejectedOutput, read_regular

    out = tmp_path / "out"
    out.mkdir()
    secret = tmp_path / "secret"
    secret.write_bytes(b"host file")
    (out / "ok").write_bytes(b"12345")
    (out / "link").symlink_to(secret)
    os.mkfifo(out / "fifo")
    (out / "twice").write_bytes(b"x")
    os.link(out / "twice", out / "twice2")
    (out / "big").write_bytes(b"x" * 100)

    assert read_regular(out, "ok", 5) == b"12345"
    for name, rule in (("link", "symbolic link"), ("fifo", "not a regular file"), ("twice", "2 hard links"),
                       ("big", "rule 'size'")):
        with pytest.raises(RejectedOutput, match=rule):
            read_regular(out, name, 50)
    with pytest.raises(FileNotFoundError):
        read_regular(out, "missing", 50)


def test_limits_have_defaults_env_overrides_and_docker_flags():
    from benchmark.runners.docker import ContainerSpec
    from benchmark.runners.images import ImageInfo

    limits = SandboxLimits.from_env(SandboxLimits.from_mapping({"tmp_bytes": "1g"}), environ={
        "MMDD_DOCKER_MEMORY": "2g", "MMDD_DOCKER_TIMEOUT": "30", "MMDD_DOCKER_PIDS": "100", "MMDD_DOCKER_CPUS": "1.5"})
    assert (limits.memory_bytes, limits.timeout_s, limits.pids_limit, limits.cpus, limits.tmp_bytes) == \
        (2 << 30, 30.0, 100, 1.5, 1 << 30)
    args = ContainerSpec(ImageInfo("img", "id"), [], limits, {"mmdd.cell": "c"}).create_args("n", ["-c", "1"])
    flags = " ".join(args)
    for flag in ("--memory 2147483648", "--memory-swap 2147483648", "--pids-limit 100", "--cpus 1.5",
                 "size=1073741824", f"--ulimit fsize={limits.out_max_bytes}", "--label mmdd.cell=c",
                 "--network none", "--read-only", "--cap-drop ALL"):
        assert flag in flags
    with pytest.raises(ValueError, match="MMDD_DOCKER_MEMORY='lots' is not a size"):
        SandboxLimits.from_env(environ={"MMDD_DOCKER_MEMORY": "lots"})
    with pytest.raises(ValueError, match=r"unknown sandbox setting\(s\) \['memory'\]"):
        SandboxLimits.from_mapping({"memory": "1g"})
    with pytest.raises(ValueError, match="sandbox.pids_limit must be a positive number"):
        SandboxLimits(pids_limit=0)


def test_local_runner_takes_a_cell_spec_and_matches_the_in_process_run(tiny_project, tmp_path):
    root, _ = tiny_project
    bench = tiny_context(root, results=tmp_path / "results")
    cell = tmp_path / "cell"
    child = get_runner("local")(cell_spec(bench, "random", cell))
    here = run_method(bench, Cell("shapes", "random", 10, 0), tmp_path / "here")
    assert torch.equal(child.phases[0].images, here.phases[0].images)
    assert (cell / "distill_log.jsonl").exists() and not (cell / ".local").exists()


def test_a_rerun_that_resumes_keeps_the_log_a_fresh_one_clears_it(tmp_path):
    """Before a container run the raw outputs are removed; the log stays when a checkpoint will resume the run (the
    method truncates it to the checkpoint's iteration itself, so earlier records are not lost)."""
    from benchmark.interface import Checkpointer
    from benchmark.runners.docker import RAW_OUTPUTS, outputs_to_clear

    assert outputs_to_clear(tmp_path) == RAW_OUTPUTS
    Checkpointer(tmp_path / "checkpoint", every=1).save({"x": torch.zeros(1)}, {"iteration": 2, "phase": 0})
    assert set(outputs_to_clear(tmp_path)) == set(RAW_OUTPUTS) - {"distill_log.jsonl"}
