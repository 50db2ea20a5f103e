"""Open ``mmdd ui``'s landing views in headless Chromium and screenshot them (a check and the docs' pictures).

``python -m benchmark.tracking.browser --out docs/images`` starts ``mmdd ui --port 0`` on the project's store,
opens the ranking table, the method comparison (charts) and the seed runs of every benchmark experiment, waits
until each shows its runs, and writes one PNG per view. Needs Playwright (PyPI) and a Chromium executable
(Debian's ``chromium``; ``$MMDD_CHROMIUM`` or ``--chromium`` names another); Playwright's own browser download is
not used.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
URL_LINE = re.compile(r"(?P<exp>\S+): (?P<what>ranking table|method comparison \(charts\)|every seed run, grouped by "
                      r"method|cross-architecture recall \(charts\)) (?P<url>http://\S+)")
VIEW_NAMES = {"ranking table": "runs_table", "method comparison (charts)": "compare_charts",
              "every seed run, grouped by method": "seed_runs", "cross-architecture recall (charts)": "cross_arch"}
CHART_VIEWS = ("compare_charts", "cross_arch")


@dataclass
class View:
    experiment: str
    name: str  # runs_table, compare_charts, seed_runs, cross_arch
    url: str
    text: str = ""
    screenshot: Path | None = None


def chromium_path(explicit: str | None = None) -> str | None:
    """The Chromium to drive: ``explicit``, ``$MMDD_CHROMIUM``, or ``chromium`` / ``chromium-browser`` on PATH."""
    for cand in (explicit, os.environ.get("MMDD_CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser")):
        if cand and Path(cand).exists():
            return cand
    return None


class UiServer:
    """``mmdd ui --port 0`` in a subprocess; collects the landing URLs it logs. Stops it (and its group) on exit."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None, results_root: str = "results",
                 timeout_s: float = 180.0):
        self.cmd = [sys.executable, "-c", "import sys; from benchmark.cli import main; sys.exit(main())", "ui",
                    "--port", "0", "--results-root", results_root]
        self.cwd, self.env, self.timeout_s = cwd, {**os.environ, **(env or {})}, timeout_s
        self.views: list[View] = []
        self.lines: list[str] = []

    def __enter__(self) -> UiServer:
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stderr=subprocess.PIPE, text=True,
                                     stdout=subprocess.DEVNULL)
        ready = threading.Event()

        def read():
            for line in self.proc.stderr:
                self.lines.append(line)
                m = URL_LINE.search(line)
                if m:
                    self.views.append(View(m["exp"], VIEW_NAMES[m["what"]], m["url"]))
                if "MLflow UI at" in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.timeout_s
        while not ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("mmdd ui did not start:\n" + "".join(self.lines[-30:]))
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # mmdd ui stops its server's process group on SIGTERM
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def capture(views: list[View], out_dir: Path, chromium: str, settle_s: float = 2.0,
            timeout_ms: float = 60_000, prefix: str = "") -> list[View]:
    """Open each view, wait until its runs are drawn, keep its visible text and write
    ``<out_dir>/<prefix><name>.png``."""
    from playwright.sync_api import sync_playwright

    out_dir.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 860})
            for view in views:
                page.goto(view.url)
                page.get_by_text(re.compile(r"\d+ matching runs")).first.wait_for(timeout=timeout_ms)
                for label in ("Close", "Toggle sidebar"):  # the assistant panel and the sidebar: room for the table
                    button = page.locator(f"button[aria-label='{label}']")
                    if button.count() == 1 and button.is_visible():
                        button.click()
                if view.name in CHART_VIEWS:
                    page.locator("canvas, svg.main-svg").first.wait_for(timeout=timeout_ms)
                time.sleep(settle_s)  # charts animate in
                view.text = page.inner_text("body")
                view.screenshot = out_dir / f"{prefix}{view.name}.png"
                page.screenshot(path=str(view.screenshot))
        finally:
            browser.close()
    return views


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/images", help="where the PNGs (mlflow_<view>.png) go [docs/images]")
    ap.add_argument("--project", default=".", help="the project whose store `mmdd ui` opens [.]")
    ap.add_argument("--chromium", default=None, help="Chromium executable [$MMDD_CHROMIUM or chromium on PATH]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    chromium = chromium_path(args.chromium)
    if chromium is None:
        log.error("no Chromium found: apt-get install chromium, or pass --chromium PATH")
        return 2
    with UiServer(Path(args.project).resolve()) as server:
        if not server.views:
            log.error("the store has no benchmark experiment: run `mmdd bench` or `mmdd record` first")
            return 1
        first = [v for v in server.views if v.experiment == server.views[0].experiment]
        for view in capture(first, Path(args.out), chromium, prefix="mlflow_"):
            log.info("%s: %s", view.name, view.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
