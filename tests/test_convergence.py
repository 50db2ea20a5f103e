import math

from benchmark.convergence import TOLERANCE, converged, phase_trends


def _log(losses, phase=0):
    return [{"phase": phase, "match_loss": v, "step": i} for i, v in enumerate(losses)]


def test_a_still_falling_loss_has_not_converged():
    hist = _log([2.0 * math.exp(-i / 100) for i in range(200)])  # falls ~1.0 %/iteration throughout
    (t,) = phase_trends(hist)
    assert t.iterations == 200 and t.decrease > TOLERANCE
    assert converged(hist) is False


def test_a_plateau_has_converged_and_a_rising_loss_is_flat_too():
    hist = _log([1.0 + 1.0 / (1 + i) for i in range(400)])
    assert converged(hist) is True
    rising = _log([1.0 + i / 1000 for i in range(100)])
    assert phase_trends(rising)[0].decrease < 0 and converged(rising) is True


def test_every_phase_must_flatten():
    flat = _log([1.0] * 40, phase=0)
    falling = _log([1.0 - i / 50 for i in range(40)], phase=1)
    assert converged(flat + falling) is False
    assert [t.phase for t in phase_trends(flat + falling)] == [0, 1]


def test_coreset_logs_are_not_judged():
    assert converged([]) is None
    assert converged([{"note": "coreset"}]) is None
