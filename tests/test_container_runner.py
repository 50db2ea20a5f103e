"""The container runner, end to end with a real Docker engine and the CPU test image (no mocks).

A method runs in a container on the tiny preset; the harness validates and evaluates its output. The sandbox is
checked from inside with the exact spec a method run gets: no network (only ``lo``), read-only data, source and
root file system, one writable output directory, the caller's uid.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from benchmark.cli import main
from benchmark.config import load_config
from benchmark.distilled import DistilledSet
from benchmark.io import read_json
from benchmark.paths import Layout
from benchmark.pipeline import Bench
from benchmark.runners import get_runner
from benchmark.runners.docker import HOST_SITE, DockerRunner
from benchmark.runners.spec import config_document
from tests.docker_env import cell_spec, cpu_test_image

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
    return ["--preset", "tiny", "--data-root", str(root / "data"), "--results-root", str(results), "--no-progress"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_method_runs_in_container_and_the_harness_evaluates_it(tiny_project, image, tmp_path):
    root, _ = tiny_project
    results = tmp_path / "docker"
    cell_args = ["--method", "random", "--budget", "10", "--seed", "0"]
    data_before = _snapshot(root / "data")

    assert main(["distill", *_args(tiny_project, results), *cell_args, "--runner", "docker"]) == 0

    assert _snapshot(root / "data") == data_before, "the container wrote into data/"
    written = {p.relative_to(results) for p in results.rglob("*") if p.is_file()}
    assert written - {CELL / "distill_log.jsonl"} == {CELL / "distilled.json", CELL / "distilled.safetensors",
                                                       CELL / "distill_info.json"}
    assert not (results / CELL / ".container").exists()
    assert all(p.stat().st_uid == os.getuid() for p in results.rglob("*"))
    info = read_json(results / CELL / "distill_info.json")
    assert info["runner"] == "docker" and info["pairs"] == 10
    meta = json.loads((results / CELL / "distilled.json").read_text())["meta"]
    assert meta["container_image"] == image and meta["runner"] == "docker"

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


def _items(doc):
    """Every (key, value) pair of a nested JSON document (the metrics layout may nest protocols)."""
    for key, value in doc.items():
        yield key, value
        if isinstance(value, dict):
            yield from _items(value)


def test_sandbox_has_no_network_and_only_the_output_dir_is_writable(tiny_project, image, tmp_path):
    root, _ = tiny_project
    bench = Bench(load_config("tiny"), Layout(root / "data", tmp_path / "results"), progress=False)
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
    args = [*_args(tiny_project, results), "-S", "methods.random.lr_img=.nan"]
    assert main(["distill", *args, "--method", "random", "--budget", "10", "--seed", "0", "--runner", "docker"]) == 2
    assert "rule 'finite'" in caplog.text and "lr_img" in caplog.text
    assert not list(results.rglob("distilled*")) and not list(results.rglob(".container"))


def test_method_failing_in_the_container_reports_its_output(tiny_project, image, tmp_path, caplog):
    root, _ = tiny_project
    data = tmp_path / "data"
    shutil.copytree(root / "data", data, ignore=shutil.ignore_patterns("experts"))
    results = tmp_path / "results"
    args = ["--preset", "tiny", "--data-root", str(data), "--results-root", str(results), "--no-progress"]
    assert main(["distill", *args, "--method", "herding", "--budget", "10", "--seed", "0", "--runner", "docker"]) == 2
    assert "failed in container" in caplog.text and "(exit 2)" in caplog.text
    assert "mmdd experts" in caplog.text  # the container's own error, relayed
    assert not list(results.rglob("distilled*"))
    assert isinstance(get_runner("docker"), DockerRunner)


def test_configuration_round_trips_into_the_container(tiny_project, tmp_path):
    root, _ = tiny_project
    cfg = load_config("tiny", ["eval.students=3", "methods.random.lr_img=0.25"])
    bench = Bench(cfg, Layout(root / "data", tmp_path), progress=False)
    doc = config_document(bench.cfg, bench.student.tower_config)
    assert doc["eval"]["students"] == 3 and doc["methods"]["random"]["lr_img"] == 0.25
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
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
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
        bench = Bench(load_config("tiny"), Layout(root / "data", tmp_path / "results"), progress=False)
        run = runner.probe(cell_spec(bench, "docker-entry", tmp_path / "cell"),
                           "print(open('/opt/mmdd/entry-marker').read().strip())", tmp_path / "out")
        assert run.rc == 0 and run.tail[-1] == marker
    finally:
        real("rmi", "-f", first.ref, check=False)
