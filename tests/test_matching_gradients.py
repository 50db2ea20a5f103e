"""Float64 gradient checks of the matching engine against autograd of each mode's own objective:

* ``tesla``: the detached-chain objective J = Σ w_m ‖θ0 − η_m Σ_i g_i(θ̄_i, Z) − θ*‖² (θ̄_i constants);
* ``full`` (``graph`` and ``adjoint``): an explicit unroll with create_graph through every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from matching_fixtures import engine_config, max_rel_err, random_setup, reference_full, reference_tesla
from matching_fixtures import single_thread  # noqa: F401  (autouse)

TOL = 1e-9

CASES = [
    dict(similarity="none", loss="ce"),
    dict(similarity="full", loss="wbce"),
    dict(similarity="lowrank", loss="wbce", sim_rank=3, sim_alpha=2.0),
    dict(similarity="full", loss="infonce", normalize="merged"),
    dict(similarity="lowrank", loss="kl", sim_rank=2, normalize="merged"),
]


def _check(got, want):
    assert set(got) == set(want)
    errs = max_rel_err(got, want)
    assert all(e < TOL for e in errs.values()), errs
    for k, v in want.items():
        assert float(v.abs().max()) > 0, f"reference gradient of {k} is zero: the check would be vacuous"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['similarity']}-{c['loss']}-{c.get('normalize', 'sep')}")
@pytest.mark.parametrize("retain", [False, True])
def test_tesla_equals_autograd_of_detached_chain(case, retain):
    cfg = engine_config(unroll="tesla", retain_graph=retain, **case)
    matcher, syn, th0, th1, plan = random_setup(cfg)
    res = matcher.step(syn, th0, th1, plan)
    J, want = reference_tesla(matcher, syn, th0, th1, plan)
    assert math.isclose(float(res.objective), float(J.detach()), rel_tol=1e-12)
    _check(res.grads, want)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['similarity']}-{c['loss']}-{c.get('normalize', 'sep')}")
@pytest.mark.parametrize("impl", ["graph", "adjoint"])
def test_full_equals_autograd_through_unroll(case, impl):
    cfg = engine_config(unroll="full", full_impl=impl, **case)
    matcher, syn, th0, th1, plan = random_setup(cfg)
    res = matcher.step(syn, th0, th1, plan)
    J, want = reference_full(matcher, syn, th0, th1, plan)
    assert math.isclose(float(res.objective), float(J.detach()), rel_tol=1e-12)
    _check(res.grads, want)


def test_full_adjoint_with_retained_forward_graphs():
    cfg = engine_config(unroll="full", full_impl="adjoint", retain_graph=True, similarity="lowrank", loss="wbce",
                        sim_rank=2)
    matcher, syn, th0, th1, plan = random_setup(cfg)
    _check(matcher.step(syn, th0, th1, plan).grads, reference_full(matcher, syn, th0, th1, plan)[1])


def test_tesla_and_full_are_different_objectives():
    cfg_t = engine_config(unroll="tesla", similarity="full", loss="wbce")
    cfg_f = engine_config(unroll="full", similarity="full", loss="wbce")
    m_t, syn, th0, th1, plan = random_setup(cfg_t)
    m_f, *_ = random_setup(cfg_f)
    gt, gf = m_t.step(syn, th0, th1, plan).grads, m_f.step(syn, th0, th1, plan).grads
    for k in ("images", "texts", "sim_full", "lr"):
        rel = float((gt[k] - gf[k]).abs().max() / gf[k].abs().max())
        assert rel > 1e-4, f"{k}: tesla and full gradients agree ({rel}); the check cannot tell them apart"


def test_tesla_lr_gradient_formula_and_separate_norm_compat():
    cfg = engine_config(unroll="tesla", similarity="lowrank", loss="wbce", normalize="merged", sim_rank=2,
                        bug_compat={"lr_grad_separate_norm": True})
    matcher, syn, th0, th1, plan = random_setup(cfg)
    res = matcher.step(syn, th0, th1, plan)
    _, want = reference_tesla(matcher, syn, th0, th1, plan, lr_grad_separate=True)
    _check(res.grads, want)


def test_dropout_is_replayed_and_resample_compat_differs():
    case = dict(unroll="tesla", similarity="full", loss="wbce")
    m1, syn, th0, th1, plan = random_setup(engine_config(**case))
    g1 = m1.step(syn, th0, th1, plan).grads
    g1b = m1.step(syn, th0, th1, plan).grads  # same plan, same seeds: bitwise the same
    assert all(torch.equal(g1[k], g1b[k]) for k in g1)
    m2, *_ = random_setup(engine_config(bug_compat={"dropout_resample": True}, **case))
    g2 = m2.step(syn, th0, th1, plan).grads
    assert float((g2["images"] - g1["images"]).abs().max()) > 0
    # with dropout off (eval-mode student) the result does not depend on the seeds at all
    m3, *_ = random_setup(engine_config(inner_dropout="off", **case))
    g3 = m3.step(syn, th0, th1, plan).grads
    plan.seeds = [s + 1 for s in plan.seeds]
    g3b = m3.step(syn, th0, th1, plan).grads
    assert all(torch.equal(g3[k], g3b[k]) for k in g3)


def test_mtt_logit_scale_compat():
    m_fix, *_ = random_setup(engine_config(unroll="full"))
    m_bug, *_ = random_setup(engine_config(unroll="full", bug_compat={"mtt_logit_scale": True}))
    assert math.isclose(m_fix.scale, 1 / 0.07)
    assert math.isclose(m_bug.scale, math.log(1 / 0.07))
    m_tau, *_ = random_setup(engine_config(unroll="tesla", bug_compat={"inner_temperature": 0.1}))
    assert math.isclose(m_tau.scale, 10.0)


@pytest.mark.parametrize("mode", ["tesla", "full"])
def test_perf_yardstick_computes_the_same_gradient(tmp_path, mode):
    """The straightforward reference iteration kept in the perf script (whole-expert load, fresh student,
    create_graph in the first pass) is the yardstick of the speed-up only if it computes the same gradient."""
    from benchmark.perf.bench_matching import Yardstick
    from matching_fixtures import tiny_student_config, write_experts
    from methods.matching.teacher import RawTeacher

    experts = write_experts(tmp_path / "experts", n_experts=2, epochs=3)
    case = dict(similarity="lowrank", loss="wbce", sim_rank=2) if mode == "tesla" else {}
    cfg = engine_config(unroll=mode, **case)
    matcher, syn, _, _, plan = random_setup(cfg)
    plan.expert, plan.start = 1, 1
    th0, th1 = RawTeacher(experts, 0).endpoints(1, 1, 1, "cpu", torch.float64)
    got = matcher.step(syn, th0, th1, plan).grads
    want = Yardstick(cfg, tiny_student_config(), experts.directory, torch.device("cpu"), torch.float64).grads(syn, plan)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-9, atol=1e-12 * float(want[k].abs().max())), k
