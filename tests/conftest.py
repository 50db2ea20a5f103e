import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A data/ and results/ root with the tiny preset fetched and embedded (shared, read-only by convention)."""
    from benchmark.cli import main

    root = tmp_path_factory.mktemp("tiny")
    args = ["--preset", "tiny", "--data-root", str(root / "data"), "--results-root", str(root / "results"),
            "--no-progress"]
    assert main(["fetch", *args]) == 0
    assert main(["embed", *args]) == 0
    assert main(["experts", *args]) == 0
    return root, args
