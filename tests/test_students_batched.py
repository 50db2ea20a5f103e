"""Batched evaluation students (benchmark/students_batched.py) against training them one by one, in float64."""

import pytest
import torch
from torch.nn import functional as F

from benchmark.distilled import DistilledSet, Phase
from benchmark.evaluation import EvalConfig, SplitData, evaluate_set, train_student
from benchmark.models.student import StudentConfig, build_student
from benchmark.models.towers import load_tower_config
from benchmark.seeding import seeded
from benchmark.students_batched import StudentStack, evaluate_set_batched, train_students_batched, use_batched
from tests.helpers import tiny_student

SEEDS = [11, 12, 13]


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _set(n=10, phases=1, sim=False, loss="ce", lrs=((0.05, 0.08),), size=8, text_dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(phases):
        p = Phase(torch.randn(n, 3, size, size, generator=g), torch.randn(n, text_dim, generator=g), *lrs[k % len(lrs)])
        if sim:
            p.similarity, p.sim_full = "full", torch.rand(n, n, generator=g) * 0.5 + torch.eye(n) * 0.5
        out.append(p)
    return DistilledSet(out, {}, loss=loss)


def _one_by_one(dset, student, cfg, seeds=SEEDS):
    return [train_student(dset, student, cfg, s) for s in seeds]


def _max_diff(models_a, models_b) -> float:
    worst = 0.0
    for a, b in zip(models_a, models_b):
        sa, sb = a.state_dict(), b.state_dict()
        assert list(sa) == list(sb)
        for name in sa:
            if sa[name].is_floating_point():
                worst = max(worst, float((sa[name] - sb[name]).abs().max()))
            else:  # BatchNorm's num_batches_tracked
                assert torch.equal(sa[name], sb[name]), name
    return worst


def _flat(tree, prefix=""):
    """{dotted path: leaf} of nested dicts and lists (pytest.approx compares flat mappings)."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flat(sub, f"{prefix}{i}.").items()}
    return {prefix: tree}


def test_replayed_dropout_masks_are_the_sequential_ones_bit_for_bit():
    """Student k's masks are what F.dropout draws from the global generator seeded with its seed, call by call."""
    student = tiny_student()
    models = [build_student(student, seed=s) for s in SEEDS]
    stack = StudentStack(models, SEEDS)
    x, t = torch.randn(5, 3, 8, 8), torch.randn(5, 6)
    h = torch.randn(5, models[0].text_projection.fc.out_features)
    got = [stack._masks(x, t) for _ in range(2)]  # two steps
    for k, seed in enumerate(SEEDS):
        with seeded(seed):
            for step in range(2):
                want = F.dropout(h, student.head_dropout, True)
                assert torch.equal(h * got[step][0][k], want)


@pytest.mark.parametrize("case", ["plain", "two-phases-targets-overlap", "shared-optimizer"])
def test_batched_students_equal_sequential_training(float64, case):
    student = tiny_student()
    if case == "plain":
        dset, cfg = _set(), EvalConfig(students=3, epochs=4, batch_size=4)
    elif case == "two-phases-targets-overlap":
        dset = _set(phases=2, sim=True, loss="wbce", lrs=((0.05, 0.08), (0.02, 0.03)))
        cfg = EvalConfig(students=3, epochs=3, batch_size=4, batching="overlap", lr_drop=True)
    else:  # the PTM reference's schedule: one optimiser and one lr drop across phases, overlapping batches
        dset = _set(phases=2, lrs=((0.05, 0.08), (0.02, 0.03)))
        cfg = EvalConfig(students=3, compat="ptm")
    want = _one_by_one(dset, student, cfg)
    got = train_students_batched(dset, student, cfg, SEEDS)
    init = [build_student(student, seed=s) for s in SEEDS]
    assert _max_diff(want, init) > 1e-3  # the students did move
    assert _max_diff(want, got) < 1e-12


def test_batched_students_follow_the_hooks_and_protocols(float64):
    """evaluate_set_batched returns evaluate_set's output: same students, per-protocol selection and epochs."""
    student = tiny_student()
    g = torch.Generator().manual_seed(3)
    test = SplitData(torch.randn(12, 3, 8, 8, generator=g), torch.randn(24, 6, generator=g),
                     torch.arange(12).repeat_interleave(2))
    val = SplitData(torch.randn(12, 3, 8, 8, generator=g), torch.randn(24, 6, generator=g),
                    torch.arange(12).repeat_interleave(2))
    for select in ("final", "val"):
        cfg = EvalConfig(students=3, epochs=6, batch_size=4, eval_every=2, protocols=["strict", "paper"],
                         select=select)
        want = evaluate_set(_set(), student, cfg, test, val, progress=False)
        got = evaluate_set_batched(_set(), student, cfg, test, val, progress=False)
        assert _flat(got) == pytest.approx(_flat(want), abs=1e-9)
        assert [s["epoch"] for s in got["protocols"]["paper"]["students"]] == \
            [s["epoch"] for s in want["protocols"]["paper"]["students"]]


def test_batched_students_with_batch_norm_running_statistics(float64):
    """A timm ResNet (BatchNorm buffers updated in training) batched equals one by one; rounding grows through BN
    over the steps, so the bound is looser than for the ConvNet."""
    cfg = load_tower_config("resnet10t_32")
    cfg["image_size"] = 16
    student = StudentConfig(tower="resnet10t_32", text_dim=6, tower_config=cfg)
    dset = _set(n=8, size=16)
    ecfg = EvalConfig(students=2, epochs=2, batch_size=4)
    want = _one_by_one(dset, student, ecfg, SEEDS[:2])
    got = train_students_batched(dset, student, ecfg, SEEDS[:2])
    assert _max_diff(want, got) < 1e-9
    bn = [n for n in got[0].state_dict() if n.endswith("running_var")]
    assert bn and not torch.allclose(got[0].state_dict()[bn[0]], torch.ones_like(got[0].state_dict()[bn[0]]))


def test_non_finite_loss_names_the_student():
    dset = _set(lrs=((1e30, 1e30),))
    with pytest.raises(FloatingPointError, match="student"):
        train_students_batched(dset, tiny_student(), EvalConfig(students=2, epochs=3, batch_size=5), SEEDS[:2])


def test_when_students_are_batched():
    assert not use_batched("auto", "cpu", 3)
    assert use_batched("auto", "cuda", 3) and use_batched("batched", "cpu", 3)
    assert not use_batched("batched", "cpu", 1) and not use_batched("sequential", "cuda", 5)
    with pytest.raises(ValueError, match="students mode"):
        use_batched("vmap", "cpu", 3)
