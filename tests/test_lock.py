"""requirements.lock: compiled from pyproject.toml, every package pinned with hashes, torch pins in agreement."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "lockfile.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("lockfile", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lockfile"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


lockfile = _load_tool()


@pytest.fixture()
def project(tmp_path):
    """A copy of pyproject.toml and requirements.lock to edit."""
    for name in ("pyproject.toml", "requirements.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path / "pyproject.toml", tmp_path / "requirements.lock"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _check_cli(pyproject: Path, lock: Path) -> subprocess.CompletedProcess:
    """What .ci/run runs, with the interpreter the tests use."""
    return subprocess.run([sys.executable, str(TOOL), "--pyproject", str(pyproject), "--lock", str(lock), "check"],
                          capture_output=True, text=True, timeout=60)


def test_the_committed_lock_matches_pyproject():
    assert lockfile.problems(REPO / "pyproject.toml", REPO / "requirements.lock") == []
    done = _check_cli(REPO / "pyproject.toml", REPO / "requirements.lock")
    assert done.returncode == 0, done.stderr


def test_a_changed_dependency_makes_the_lock_stale(project):
    pyproject, lock = project
    _edit(pyproject, '"tqdm>=4.66,<5"', '"tqdm>=4.67,<5"')
    found = lockfile.problems(pyproject, lock)
    assert len(found) == 1 and "make lock" in found[0] and "other dependency lists" in found[0]
    done = _check_cli(pyproject, lock)
    assert done.returncode == 1 and "make lock" in done.stderr


def test_a_new_dev_dependency_makes_the_lock_stale(project):
    pyproject, lock = project
    _edit(pyproject, 'dev = ["pytest', 'dev = ["hypothesis>=6", "pytest')
    assert any("other dependency lists" in p for p in lockfile.problems(pyproject, lock))


def test_cosmetic_edits_of_pyproject_keep_the_digest(project):
    pyproject, _ = project
    before = lockfile.pyproject_digest(pyproject)
    _edit(pyproject, '"open_clip_torch>=3.0,<4",', '"Open-Clip.Torch >= 3.0, < 4",')
    _edit(pyproject, '  "tabulate>=0.9,<1",\n', '')
    _edit(pyproject, '  "pyyaml>=6,<7",\n', '  "pyyaml>=6,<7",\n  "tabulate>=0.9,<1",  # moved\n')
    _edit(pyproject, 'description = "', 'description = "Now: ')
    assert lockfile.pyproject_digest(pyproject) == before


def test_a_lock_without_the_digest_line_is_rejected(project):
    pyproject, lock = project
    lock.write_text(re.sub(r"^# pyproject-deps-sha256: .*\n", "", lock.read_text(), flags=re.M))
    found = lockfile.problems(pyproject, lock)
    assert found and "no '# pyproject-deps-sha256:' header line" in found[0]


def test_every_locked_package_is_pinned_with_hashes():
    text = (REPO / "requirements.lock").read_text()
    lock = lockfile.parse_lock(text)
    starts = [line for line in text.splitlines() if line and not line[0].isspace() and not line.startswith("#")]
    assert len(lock.pins) == len(starts) > 100
    assert all(re.fullmatch(r"[a-z0-9-]+==[A-Za-z0-9.+!]+ \\", line) for line in starts), starts
    for pin in lock.pins:
        assert pin.hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in pin.hashes), pin.name
    assert not re.search(r"^-(e|-index-url|-extra-index-url|-find-links)", text, re.M), "machine-specific lines"
    names = {p.name for p in lock.pins}
    assert {"torch", "torchvision", "triton", "nvidia-cudnn-cu13", "setuptools", "scipy", "import-linter",
            "pytest", "ray", "mlflow", "dvc"} <= names


def test_an_unhashed_or_unpinned_entry_is_rejected(project):
    _, lock = project
    text = lock.read_text()
    unhashed = re.sub(r"^(tqdm==\S+) \\\n(    --hash=\S+ \\\n)*    --hash=\S+\n", r"\1\n", text, count=1, flags=re.M)
    assert unhashed != text
    with pytest.raises(lockfile.LockError, match=r"tqdm==\S+ has no --hash.*make lock"):
        lockfile.parse_lock(unhashed)
    with pytest.raises(lockfile.LockError, match=r"requirements.lock:\d+: 'tqdm>=\S+ \\\\' is not pinned with =="):
        lockfile.parse_lock(re.sub(r"^tqdm==", "tqdm>=", text, count=1, flags=re.M))


def test_torch_and_torchvision_pins_agree_with_pyproject(project):
    pyproject, lock = project
    wanted = lockfile.exact_pins(lockfile.read_project(REPO / "pyproject.toml")["dependencies"])
    locked = lockfile.read_lock(REPO / "requirements.lock")
    for name in ("torch", "torchvision"):
        assert locked.pin(name).version == wanted[name]
    _edit(lock, "\ntorchvision==0.29.1 \\", "\ntorchvision==0.29.0 \\")
    found = lockfile.problems(pyproject, lock)
    assert found == [f"requirements.lock: torchvision==0.29.0 but pyproject.toml pins torchvision=={wanted['torchvision']}"
                     f": {lockfile.FIX}"]


def test_pyproject_must_pin_torch_exactly(project):
    pyproject, lock = project
    _edit(pyproject, '"torch==2.14.1"', '"torch>=2.14,<2.15"')
    assert any("torch must be pinned with ==" in p for p in lockfile.problems(pyproject, lock))


def test_stamping_twice_leaves_one_digest_line(project):
    _, lock = project
    once = lockfile.stamp(lock.read_text(), "0" * 64)
    twice = lockfile.stamp(once, "1" * 64)
    assert twice.count("# pyproject-deps-sha256: ") == 1
    assert lockfile.parse_lock(twice).digest == "1" * 64
    assert twice.replace("1" * 64, "") == once.replace("0" * 64, "")


def test_rewriting_the_lock_keeps_it_readable_by_others(project):
    _, lock = project
    lock.chmod(0o644)
    lockfile.write_atomic(lock, lockfile.stamp(lock.read_text(), "2" * 64))
    assert lock.stat().st_mode & 0o777 == 0o644 and lockfile.read_lock(lock).digest == "2" * 64


def test_an_image_without_the_locked_torch_installs_the_whole_lock(project):
    _, lock = project
    _edit(lock, "\ntorch==2.14.1 \\", "\ntorch==2.14.0 \\")  # no interpreter here has 2.14.0
    parsed = lockfile.read_lock(lock)
    assert lockfile.image_requirements(parsed, "auto") == list(parsed.pins)
    assert lockfile.image_requirements(parsed, "lock") == list(parsed.pins)


def test_an_image_with_another_python_than_the_lock_is_refused(project):
    _, lock = project
    _edit(lock, "pip-compile with Python 3.11", "pip-compile with Python 3.10")
    with pytest.raises(lockfile.LockError, match=r"compiled for Python 3.10, this interpreter is Python 3\.\d+: use a base"):
        lockfile.image_requirements(lockfile.read_lock(lock), "lock")


def test_an_image_whose_base_has_the_locked_torch_installs_the_rest(tmp_path):
    lock = lockfile.read_lock(REPO / "requirements.lock")
    if not lockfile.base_has_locked_torch(lock):
        pytest.skip("this interpreter lacks the locked torch/torchvision (install with `make install`)")
    kept = lockfile.image_requirements(lock, "auto")
    names = {p.name for p in kept}
    assert not {n for n in names if n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-"))}
    assert {"numpy", "open-clip-torch", "sympy", "setuptools"} <= names
    assert len(kept) == len(lock.pins) - sum(lockfile.in_torch_stack(p.name) for p in lock.pins)
    out = tmp_path / "image-requirements.txt"
    out.write_text(subprocess.run([sys.executable, str(TOOL), "for-image"], capture_output=True, text=True,
                                  check=True, timeout=60).stdout)
    assert [(p.name, p.version, p.hashes) for p in lockfile.read_lock(out).pins] == [
        (p.name, p.version, p.hashes) for p in kept]


def _local_wheels() -> dict[Path, str]:
    """Wheel files this machine's pip configuration offers from local disk, each with its sha256."""
    done = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60)
    found: dict[Path, str] = {}
    for key, value in re.findall(r"^\S*\.(extra-index-url|index-url|find-links)='([^']*)'$", done.stdout, re.M):
        for location in value.split():
            path = Path(unquote(urlparse(location).path)) if location.startswith("file:") else Path(location)
            if key == "find-links" and path.is_dir():
                found.update({wheel: "" for wheel in path.glob("*.whl")})
            elif path.is_dir():
                for index in path.glob("*/index.html"):
                    for href, sha in re.findall(r'href="([^"#]+\.whl)#sha256=([0-9a-f]{64})"', index.read_text()):
                        found[(index.parent / unquote(href)).resolve()] = sha
    return found


def test_wheels_on_local_disk_are_accepted_by_the_lock_hashes():
    """pip takes torch, torchvision and the CUDA wheels from this machine's disk only if the lock lists their hashes."""
    lock = lockfile.read_lock(REPO / "requirements.lock")
    checked = []
    for wheel, sha in _local_wheels().items():
        name, version = wheel.name.split("-")[:2]
        pin = lock.pin(name)
        if pin is None or pin.version != version or not re.search(r"-(py3|cp311)-", wheel.name):
            continue
        sha = sha or hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert sha in pin.hashes, f"{wheel} is not accepted by the lock's hashes for {pin.name}=={pin.version}"
        checked.append(pin.name)
    if "torch" not in checked:
        pytest.skip("this machine's pip offers no local wheel of the locked torch")
    assert {"torchvision", "nvidia-cublas"} <= set(checked)
