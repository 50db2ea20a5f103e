import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A data/ and results/ root with the tiny preset fetched and embedded (shared, read-only by convention)."""
    from benchmark.cli import main
    from helpers import stage_args, tiny_params

    root = tmp_path_factory.mktemp("tiny")
    tiny_params(root)
    args = stage_args(root)
    assert main(["fetch", *args]) == 0
    assert main(["embed", *args]) == 0
    assert main(["experts", *args]) == 0
    return root, args
