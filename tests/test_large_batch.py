"""The critical-batch arithmetic behind notebook 06 (the training runs are in the notebook)."""

import math

import pytest

from accumlab.lab import large_batch as lb


def test_mccandlish_relation_and_regimes():
    for ratio in (0.1, 1.0, 10.0):
        s, e = lb.steps_factor(ratio, 1.0), lb.examples_factor(ratio, 1.0)
        assert (s - 1) * (e - 1) == pytest.approx(1.0)
    assert lb.steps_factor(1000, 1000) == lb.examples_factor(1000, 1000) == 2.0
    assert [lb.regime(b, 100) for b in (5, 10, 50, 999, 1000, 5000)] == [
        "perfect scaling", "perfect scaling", "diminishing returns", "diminishing returns",
        "no returns", "no returns"]


def test_fit_tradeoff_recovers_a_known_curve_and_refuses_bad_data():
    s_min, b_crit = 40.0, 24.0
    runs = [{"batch": b, "steps": s_min * (1 + b_crit / b), "reached": True}
            for b in (4, 8, 16, 32, 64)]
    fit = lb.fit_tradeoff(runs)
    assert fit["S_min"] == pytest.approx(s_min) and fit["B_crit"] == pytest.approx(b_crit)
    assert fit["E_min"] == pytest.approx(s_min * b_crit)
    steps, data = lb.tradeoff_curve(fit["S_min"], fit["E_min"])
    assert all((s / s_min - 1) * (d / (s_min * b_crit) - 1) == pytest.approx(1.0)
               for s, d in zip(steps, data, strict=True))
    assert math.isnan(lb.fit_tradeoff(runs[:1])["B_crit"])
    rising = [{"batch": b, "steps": b, "reached": True} for b in (4, 8, 16)]
    assert math.isnan(lb.fit_tradeoff(rising)["B_crit"])  # steps growing with B: no fit


def test_crossing_interpolates_and_split_keeps_two_micro_batches():
    assert lb.crossing([(0, 8.0), (10, 6.0)], 7.0) == pytest.approx(5.0)
    assert lb.crossing([(0, 8.0), (10, 7.5)], 7.0) is None
    assert lb.crossing([(3, 6.0)], 7.0) == 3
    assert lb._split(4, 16) == (2, 2) and lb._split(64, 16) == (16, 4)
    with pytest.raises(ValueError, match="two micro-batches"):
        lb._split(1, 16)
