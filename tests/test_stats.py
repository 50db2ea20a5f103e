"""benchmark.stats against known answers: a hand-computed t interval, the textbook paired and Welch t-tests on
Student's sleep data (as R's ``t.test`` reports them), and rankings with tie groups."""

import math

import pytest

from benchmark.stats import PAIRED, WELCH, compare, rank, t_interval

# Cushny & Peebles' sleep data (Student 1908; R's `sleep`): extra hours of sleep of 10 patients under two drugs.
DRUG1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
DRUG2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_t_interval_of_a_tiny_sample_by_hand():
    # 1..5: mean 3, s = sqrt(2.5), sem = sqrt(0.5); t(0.975, df 4) = 2.776445 (tables)
    iv = t_interval([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(0.5)
    assert iv.mean == 3 and iv.n == 5
    assert iv.lo == pytest.approx(3 - half, abs=1e-5) and iv.hi == pytest.approx(3 + half, abs=1e-5)
    assert iv.half_width == pytest.approx(1.963243, abs=1e-5)


def test_t_interval_of_one_value_has_no_bounds_and_constant_values_a_point():
    one = t_interval([4.0])
    assert one.mean == 4.0 and math.isnan(one.lo) and math.isnan(one.hi)
    const = t_interval([2.0, 2.0, 2.0])
    assert (const.lo, const.hi) == (2.0, 2.0)


def test_paired_t_test_matches_the_textbook_sleep_example():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE) -> t = -4.0621, df = 9, p = 0.002833,
    # 95 % CI [-2.4598858, -0.7001142], mean difference -1.58
    c = compare(dict(enumerate(DRUG1)), dict(enumerate(DRUG2)), "drug1", "drug2")
    assert c.test == PAIRED and c.n == 10 and c.significant
    assert c.diff == pytest.approx(-1.58)
    assert c.p == pytest.approx(0.002833, abs=5e-7)
    assert (c.lo, c.hi) == (pytest.approx(-2.4598858, abs=1e-6), pytest.approx(-0.7001142, abs=1e-6))


def test_unmatched_seeds_fall_back_to_welch_with_the_textbook_answer():
    # R: t.test(extra ~ group, data = sleep) -> Welch, t = -1.8608, df = 17.776, p = 0.07939,
    # 95 % CI [-3.3654832, 0.2054832]
    a = dict(enumerate(DRUG1))
    b = {s + 100: v for s, v in enumerate(DRUG2)}  # other seeds: nothing to pair
    c = compare(a, b)
    assert c.test == WELCH and c.n == 20 and not c.significant
    assert c.p == pytest.approx(0.07939, abs=5e-6)
    assert (c.lo, c.hi) == (pytest.approx(-3.3654832, abs=1e-6), pytest.approx(0.2054832, abs=1e-6))


def test_pairing_removes_shared_seed_noise():
    # b = a - 0.5 on every seed, with large seed-to-seed variation: paired is decisive, Welch is not
    a = {0: 1.0, 1: 9.0, 2: 4.0, 3: 7.0}
    b = {s: v - 0.5 + 0.01 * s for s, v in a.items()}
    assert compare(a, b).p < 1e-4
    assert compare(a, {s + 10: v for s, v in b.items()}).p > 0.5


def test_differences_constant_up_to_rounding_are_decided_exactly():
    a = {0: 0.3, 1: 1.7, 2: 2.9}
    shifted = compare(a, {s: v - 0.7 for s, v in a.items()})  # 0.7 in floats: differences equal up to rounding
    assert shifted.p == 0.0 and shifted.lo == shifted.hi == pytest.approx(0.7)
    same = compare(a, {s: (v + 0.1) - 0.1 for s, v in a.items()})
    assert same.p == 1.0 and same.diff == pytest.approx(0.0, abs=1e-12)


def test_a_single_seed_cannot_be_tested():
    c = compare({0: 3.0}, {0: 1.0})
    assert c.test == WELCH and c.p == 1.0 and math.isnan(c.lo) and c.diff == 2.0


def test_ranking_groups_methods_not_significantly_below_the_group_leader():
    seeds = range(5)
    base = [10.0, 12.0, 11.0, 9.0, 13.0]
    d_ab = [1.0, -0.5, 1.2, 0.1, 0.7]  # a - b: mean 0.5, not significant (p ~ 0.18)
    d_bc = [0.3, 1.6, 0.1, 1.2, 0.4]  # b - c: not significant (p ~ 0.07) ...
    a = {s: base[s] for s in seeds}
    b = {s: a[s] - d_ab[s] for s in seeds}
    c = {s: b[s] - d_bc[s] for s in seeds}  # ... but a - c = 1.2 ± 0.1: significant
    far = {s: a[s] - 8.0 + 0.3 * s for s in seeds}
    assert not compare(a, b).significant and not compare(b, c).significant and compare(a, c).significant
    out = {r.method: r for r in rank({"c": c, "far": far, "a": a, "b": b})}
    assert [out[m].rank for m in ("a", "b", "c", "far")] == [1, 1, 3, 4]
    assert [out[m].group for m in ("a", "b", "c", "far")] == [1, 1, 2, 3]
    assert out["b"].leader == "a" and out["b"].vs_leader.p > 0.05 and out["a"].vs_leader is None
    assert out["c"].leader == "c"  # no chaining a ~ b ~ c: c is compared with the leader a, not with b


def test_ranking_with_identical_values_is_one_group_ordered_by_name():
    vals = {"z": {0: 1.0, 1: 2.0}, "y": {0: 1.0, 1: 2.0}}
    out = rank(vals)
    assert [(r.method, r.rank, r.group) for r in out] == [("y", 1, 1), ("z", 1, 1)]
    assert out[1].vs_leader.p == 1.0
