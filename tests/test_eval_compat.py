"""Published-evaluation switches (eval.compat): each pins the reference code's schedule on a toy two-phase set."""

import pytest
import torch

import benchmark.evaluation as ev
from benchmark.distilled import DistilledSet, Phase
from benchmark.evaluation import EvalConfig, schedule, train_student
from tests.helpers import tiny_student


def _set(n=(5, 3), lrs=((0.01, 0.02), (0.03, 0.04))):
    g = torch.Generator().manual_seed(0)
    phases = [Phase(torch.randn(k, 3, 8, 8, generator=g), torch.randn(k, 6, generator=g), a, b)
              for k, (a, b) in zip(n, lrs)]
    return DistilledSet(phases, {}, loss="ce")


def _record(monkeypatch, compat, dset):
    """Per optimiser step: (η_img, η_txt, batch size, optimiser id); and the (phase, epoch) of every evaluation hook."""
    steps, evals = [], []
    real = ev.contrastive_step

    def spy(model, opt, x, t, s, loss):
        steps.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"], len(x), id(opt)))
        return real(model, opt, x, t, s, loss)

    monkeypatch.setattr(ev, "contrastive_step", spy)
    cfg = EvalConfig(students=1, epochs=4, batch_size=4, eval_every=2, compat=compat, weight_decay=0.0)
    train_student(dset, tiny_student(), cfg, seed=0, on_eval=lambda k, e: evals.append((k, e)))
    return steps, evals


def test_default_schedule_is_each_phase_on_its_own():
    s = schedule(_set(), EvalConfig(epochs=4))
    assert s.epochs == [4, 4] and s.lrs == [(0.01, 0.02), (0.03, 0.04)] and not s.shared_optimizer


def test_lors_switch(monkeypatch):
    steps, evals = _record(monkeypatch, "lors", _set())
    # 101 epochs per phase; N <= 128 pairs: one overlapping batch of all N per epoch
    assert len(steps) == 202 and {n for _, _, n, _ in steps} == {5, 3}
    first = steps[:101]
    assert first[0][:2] == (0.01, 0.02) and first[50][:2] == (0.01, 0.02)
    assert first[51][:2] == pytest.approx((0.001, 0.002))  # ×0.1 from epoch index 51
    assert steps[101][:2] == (0.03, 0.04)  # phase 1: its own η, fresh optimiser and schedule
    assert steps[0][3] != steps[101][3]
    assert [e for k, e in evals if k == 0] == list(range(0, 101, 10))


def test_ptm_switch_shares_one_optimiser_and_uses_the_last_phase_rates(monkeypatch):
    steps, evals = _record(monkeypatch, "ptm", _set())
    assert len(steps) == 202
    assert steps[0][:2] == (0.03, 0.04)  # the last phase's η, for the first phase too
    assert steps[51][:2] == pytest.approx((0.003, 0.004))
    assert steps[101][:2] == pytest.approx((0.003, 0.004))  # the drop carried into phase 1
    assert len({o for *_, o in steps}) == 1  # one optimiser (momentum carries over)
    assert [e for k, e in evals if k == 1] == list(range(0, 101, 10))


def test_mtt_switch(monkeypatch):
    dset = _set(n=(100, 3))
    steps, evals = _record(monkeypatch, "mtt", dset)
    phase0 = [s for s in steps if s[2] in (64, 36)]
    assert len(phase0) == 2 * 51  # batch 64: 100 pairs = 64 + 36, for 51 epochs
    assert {s[:2] for s in steps[:102]} == {(0.01, 0.01)}  # η_img for both towers, constant lr
    assert evals == [(0, 50), (1, 50)]  # tested once per phase, after training


def test_unknown_compat_is_refused():
    with pytest.raises(ValueError, match="eval.compat"):
        EvalConfig(compat="lorz")
