"""The MLflow UI, as a researcher meets it: `mmdd ui` against a real server over a store the pipeline recorded,
opened in headless Chromium. The landing views must show the recall columns and compare the methods at a glance.

Needs Playwright and a Chromium executable (Debian's `chromium`); skipped without them unless MMDD_REQUIRE_BROWSER=1
(CI installs both and sets it). Screenshots go to $MMDD_SCREENSHOT_DIR when set (else the test's tmp dir).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from benchmark.cli import main
from benchmark.tracking.browser import UiServer, capture, chromium_path
from helpers import stage_args

CHROMIUM = chromium_path()
try:
    import playwright.sync_api  # noqa: F401
    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False
MISSING = None if CHROMIUM and HAVE_PLAYWRIGHT else (
    f"needs {'Playwright' if not HAVE_PLAYWRIGHT else 'a Chromium executable (apt-get install chromium)'}")
if MISSING and os.environ.get("MMDD_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"MMDD_REQUIRE_BROWSER=1 but the browser test {MISSING}")
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
METHODS = ("random", "herding")


@pytest.fixture(scope="module")
def recorded(tiny_project, tmp_path_factory):
    """A project whose store holds two methods x two seeds (random's also across architectures) and the reference
    rows, recorded as `mmdd` runs them."""
    root, _ = tiny_project
    project = tmp_path_factory.mktemp("ui")
    (project / ".git").mkdir()
    (project / "params.yaml").write_text((root / "params.yaml").read_text())
    results = project / "results"
    args = stage_args(root, params=project / "params.yaml", results=results)
    for method in METHODS:
        for stage in ("distill", "evaluate"):
            assert main([stage, *args, "--method", method, "--budget", "10"]) == 0
    assert main(["cross-arch", *args, "--method", "random", "--budget", "10",
                 "-S", "cross_arch.towers=[convnet_w64_d4]"]) == 0
    assert main(["full-data", *args]) == 0
    return project


def test_landing_views_show_recall_columns_and_a_method_comparison(recorded):
    out = Path(os.environ.get("MMDD_SCREENSHOT_DIR") or recorded / "screenshots")
    env = {"MLFLOW_TRACKING_URI": ""}  # the project's own store
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with UiServer(recorded, env=env) as server:
        views = {v.name: v for v in server.views if v.experiment == "mmdd/tiny/shapes"}
        assert set(views) == {"runs_table", "compare_charts", "seed_runs", "cross_arch"}, server.lines[-20:]
        capture(list(views.values()), out, CHROMIUM)
    table = views["runs_table"].text
    # the ranking: a row per (method, budget) and per reference, with the strict recall and its interval
    refs = {json.loads(p.read_text())["method"]
            for p in (recorded / "results/cells/tiny/shapes/full-data").glob("metrics*.json")}
    for needle in ("test.strict.r_mean", "seeds", "random/b10", "herding/b10", *refs,
                   f"{len(METHODS) + len(refs)} matching runs"):
        assert needle in table, (needle, table[-2000:])
    assert "random/b10/s0" not in table  # seeds are one level down, in their own view
    charts = views["compare_charts"].text
    assert "Mean recall over seeds" in charts and "2 matching runs" in charts  # methods only: no full-data bar
    assert "random/b10" in charts and "herding/b10" in charts
    seeds = views["seed_runs"].text
    assert re.search(r"Group: random\s+2", seeds) and "random/b10/s1" in seeds and "4 matching runs" in seeds
    cross = views["cross_arch"].text
    assert "Cross-architecture mean recall over seeds" in cross and "convnet_w64_d4" in cross
    assert "random/b10" in cross and "2 matching runs" in cross  # every table row, references left out
    for view in views.values():
        assert view.screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
