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
    # up to 8 micro-batches (the noise scale's window 8x its first micro-batch), at least 2
    assert [lb._split(b, 16) for b in (2, 4, 8, 32, 64)] == [(1, 2), (1, 4), (1, 8), (4, 8),
                                                              (8, 8)]
    assert lb._split(256, 16) == (16, 16) and lb._split(12, 16) == (1, 12)
    with pytest.raises(ValueError, match="two micro-batches"):
        lb._split(1, 16)


def test_rule_names_are_checked_and_regime_reads_the_live_noise_scale():
    with pytest.raises(ValueError, match="unknown rule 'cubic'"):
        lb.rule_run([], [], 4, "cubic", base_lr=1e-3, base_batch=4, target_loss=1.0,
                    max_steps=1)
    run = {"batch": 8, "mean_length": 25.0, "noise_scale_tokens": 100.0}
    assert lb.run_regime(run) == {"batch_tokens": 200.0, "ratio": 2.0,
                                  "regime": "diminishing returns"}
    assert lb.run_regime({**run, "noise_scale_tokens": math.nan})["regime"] == "unknown"


def test_unigram_loss_is_the_cross_entropy_of_token_frequencies():
    train = [{"input_ids": [9, 1, 1, 2]}]  # next tokens 1, 1, 2: frequencies 2/3, 1/3
    held_out = [{"input_ids": [9, 1, 2]}]
    # add-1/2 smoothing over the 2 ids seen: p(1) = 2.5/4, p(2) = 1.5/4
    expected = -(math.log(2.5 / 4) + math.log(1.5 / 4)) / 2
    assert lb.unigram_loss(train, held_out) == pytest.approx(expected)
