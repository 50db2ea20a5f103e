"""The project's own files, copied into a scratch directory (what benchmarks and tests run a pipeline in)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def copy_repo(dst: str | Path, repo: Path = REPO) -> Path:
    """Copy the repository's files (tracked and untracked-not-ignored; no data/ or results/) into ``dst``."""
    dst = Path(dst)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = repo / rel
        if src.is_file() and not rel.startswith(("results/", "data/")):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    return dst
