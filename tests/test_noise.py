"""The gradient noise scale: the two-batch estimator is unbiased, and on a real classifier the
trainer's way of feeding it (first micro-batch vs window) recovers the exact B_simple."""

import math
import random

import pytest
import torch

from accumlab.data.textclass import LABELS, classification_examples
from accumlab.data.tokenizer import load_tokenizer
from accumlab.engine.collate import pad_collate
from accumlab.engine.noise import NoiseScale, two_batch_estimate
from accumlab.lab.noise import (
    BagOfWordsClassifier,
    NoiseProbe,
    exact_noise_scale,
    per_example_gradients,
    sequence_noise_scale,
    window_noise_pair,
)


def _gaussian_pairs(trials, dim, small, big, seed=0):
    """Mean gradients of the first `small` and of all `big` items, items ~ N(G, diag(var))."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g, dtype=torch.float64) * 0.3
    var = torch.rand(dim, generator=g, dtype=torch.float64) * 2.0
    std = var.sqrt()
    # The small batch and the rest of the window are independent; the window contains both.
    small_mean = mean + torch.randn(trials, dim, generator=g, dtype=torch.float64) * std / small**0.5
    rest = big - small
    rest_mean = mean + torch.randn(trials, dim, generator=g, dtype=torch.float64) * std / rest**0.5
    big_mean = (small * small_mean + rest * rest_mean) / big
    truth = {"grad_sq": float(mean.pow(2).sum()), "trace_sigma": float(var.sum())}
    return small_mean.pow(2).sum(1), big_mean.pow(2).sum(1), truth


def test_two_batch_estimator_is_unbiased_on_gaussian_gradients():
    small, big = 4, 32
    small_sq, big_sq, truth = _gaussian_pairs(200_000, 20, small, big)
    grad_sq = (big * big_sq - small * small_sq) / (big - small)
    trace = (small_sq - big_sq) / (1 / small - 1 / big)
    for name, samples in (("grad_sq", grad_sq), ("trace_sigma", trace)):
        stderr = float(samples.std() / math.sqrt(len(samples)))
        error = float(samples.mean()) - truth[name]
        print(f"{name}: truth {truth[name]:.4f}, mean estimate {float(samples.mean()):.4f}, "
              f"error {error / stderr:+.2f} standard errors")
        assert abs(error) < 4 * stderr
        assert abs(error) < 0.02 * truth[name]
    # The naive estimate |G_big|^2 of |G|^2 is biased by tr(Sigma)/B_big: the test can tell.
    naive = big_sq
    naive_stderr = float(naive.std() / math.sqrt(len(naive)))
    assert float(naive.mean()) - truth["grad_sq"] > 10 * naive_stderr


def test_pure_function_matches_the_class_and_checks_sizes():
    gs, tr = two_batch_estimate(small_sq=5.0, small_items=2, big_sq=2.0, big_items=8)
    assert gs == pytest.approx((8 * 2.0 - 2 * 5.0) / 6) and tr == pytest.approx(3.0 / (1 / 2 - 1 / 8))
    out = NoiseScale(ema=0.9).update(small_sq=5.0, small_items=2, big_sq=2.0, big_items=8)
    assert out["grad_sq"] == pytest.approx(gs) and out["trace_sigma"] == pytest.approx(tr)
    assert out["noise_scale"] == pytest.approx(tr / gs)
    with pytest.raises(ValueError, match="accum_steps > 1"):
        two_batch_estimate(1.0, 4, 1.0, 4)
    with pytest.raises(ValueError, match="ema"):
        NoiseScale(ema=1.0)


def test_noise_scale_is_nan_until_estimable():
    est = NoiseScale(ema=0.95)
    assert math.isnan(est.state()["noise_scale"])
    out = est.update(small_sq=1.0, small_items=8, big_sq=1.0, big_items=8)  # k = 1
    assert math.isnan(out["noise_scale"]) and est.pairs == 0
    out = est.update(small_sq=4.0, small_items=8, big_sq=0.5, big_items=32)  # |G|^2 < 0
    assert out["grad_sq"] < 0 and math.isnan(out["noise_scale"])


def test_ema_is_bias_corrected_and_weights_recent_pairs():
    est = NoiseScale(ema=0.5)
    pairs = [dict(small_sq=s, small_items=1, big_sq=1.0, big_items=2) for s in (3.0, 5.0)]
    values = [two_batch_estimate(**p)[1] for p in pairs]
    est.update(**pairs[0])
    assert est.state()["trace_sigma"] == pytest.approx(values[0])  # no shrink towards 0
    est.update(**pairs[1])
    assert est.state()["trace_sigma"] == pytest.approx((0.5 * values[0] + values[1]) / 1.5)


def test_state_dict_round_trip_continues_identically():
    pairs = [dict(small_sq=4.0 + i, small_items=4, big_sq=1.0, big_items=32) for i in range(5)]
    a = NoiseScale(ema=0.9)
    for p in pairs[:3]:
        a.update(**p)
    b = NoiseScale(ema=0.9)
    b.load_state_dict(a.state_dict())
    assert a.update(**pairs[3]) == b.update(**pairs[3]) and b.pairs == 4


@pytest.fixture(scope="module")
def classification_problem():
    torch.set_num_threads(1)
    tok = load_tokenizer()
    examples = classification_examples(tok, "train", max_length=64)
    random.Random(0).shuffle(examples)
    model = BagOfWordsClassifier(len(tok), len(LABELS), seed=0).double()
    return model, examples[:512], tok.pad_token_id


def test_window_pair_equals_means_of_per_example_gradients(classification_problem):
    model, examples, pad = classification_problem
    window = [examples[0:3], examples[3:8], examples[8:10]]
    model.zero_grad(set_to_none=True)
    pair = window_noise_pair(model, [pad_collate(c, pad) for c in window], task="classification")
    grads, _ = per_example_gradients(model, examples[:10], task="classification")
    assert pair["small_items"] == 3 and pair["big_items"] == 10
    assert pair["small_sq"] == pytest.approx(float(grads[:3].mean(0).pow(2).sum()), rel=1e-10)
    assert pair["big_sq"] == pytest.approx(float(grads.mean(0).pow(2).sum()), rel=1e-10)


def test_estimate_from_accumulation_windows_is_within_20_percent(classification_problem):
    model, examples, pad = classification_problem
    truth = exact_noise_scale(model, examples)
    micro, k, windows = 32, 8, 100
    rng = random.Random(1)
    plain, smoothed = NoiseScale(ema=None), NoiseScale(ema=0.98)
    for _ in range(windows):
        # micro-batches drawn uniformly with replacement, as the estimator assumes
        batches = [pad_collate([examples[rng.randrange(len(examples))] for _ in range(micro)],
                               pad) for _ in range(k)]
        model.zero_grad(set_to_none=True)
        pair = window_noise_pair(model, batches, task="classification")
        plain.update(**pair)
        smoothed.update(**pair)
    errors = {}
    for name, est in (("mean over windows", plain), ("EMA 0.98", smoothed)):
        estimate = est.state()["noise_scale"]
        errors[name] = abs(estimate / truth["noise_scale"] - 1)
        print(f"B_simple exact {truth['noise_scale']:.1f}, estimated ({name}, {windows} windows "
              f"of {micro} x {k}) {estimate:.1f}: relative error {errors[name]:.1%}")
    # Over 10 sampling seeds the errors were at most 8% (mean) and 14% (EMA 0.98); an EMA of
    # 0.95 averages about 40 windows and strays up to ~18%, so it is not asserted here.
    assert errors["mean over windows"] < 0.20
    assert errors["EMA 0.98"] < 0.20


@pytest.fixture(scope="module")
def lm_problem():
    """A tiny GPT-2 (float32) and 24 corpus sequences, with their per-sequence gradients."""
    from accumlab.data.corpus import lm_examples
    from accumlab.engine.models import make_model

    examples = lm_examples(load_tokenizer(), "train", max_length=16, limit=24)
    model = make_model("gpt2", "tiny", seed=0, max_positions=16)
    grads, counts = per_example_gradients(model, examples, task="causal_lm")
    return model, examples, grads, counts


def test_sequence_noise_scale_matches_the_formula_on_stored_gradients(lm_problem):
    """The streamed sums give what the per-sequence gradients, held in memory, give."""
    model, examples, s, n = lm_problem
    got = sequence_noise_scale(model, examples)
    mean_n, g = float(n.mean()), s.sum(0) / n.sum()
    v = float((s - n[:, None] * g).pow(2).sum()) / (len(examples) - 1) / mean_n**2
    grad_sq = float(g.pow(2).sum()) - v / len(examples)
    assert got["grad_sq"] == pytest.approx(grad_sq, rel=1e-7)
    assert got["trace_sigma"] == pytest.approx(v * mean_n, rel=1e-7)
    assert got["noise_scale"] == pytest.approx(v * mean_n / grad_sq, rel=1e-7)
    assert got["mean_tokens"] == pytest.approx(mean_n)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        sequence_noise_scale(model, examples[:1])


def test_sequence_noise_scale_predicts_the_spread_of_batch_gradients(lm_problem):
    """E|G_B|^2 = |G|^2 + tr(Sigma)/B over batches of these sequences (B in tokens)."""
    model, examples, s, n = lm_problem
    truth = sequence_noise_scale(model, examples)
    g = torch.Generator().manual_seed(0)
    picks = torch.randint(len(examples), (20_000, 8), generator=g)  # with replacement
    counts = torch.zeros(len(picks), len(examples), dtype=torch.float64)
    counts.scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float64))
    tokens = counts @ n
    sq = ((counts @ (s @ s.T)) * counts).sum(1) / tokens**2  # |sum s_i / sum n_i|^2
    # these sequences are the whole population here: its |G|^2 has no sampling noise
    population_sq = (truth["grad_sq"]
                     + truth["trace_sigma"] / truth["mean_tokens"] / len(examples))
    predicted = population_sq + truth["trace_sigma"] / float(tokens.mean())
    assert float(sq.mean()) == pytest.approx(predicted, rel=0.05)


def test_noise_probe_measures_before_during_and_after_training(lm_problem):
    from accumlab.engine.config import TrainConfig
    from accumlab.engine.models import make_model
    from accumlab.engine.trainer import train

    examples = lm_problem[1]
    model = make_model("gpt2", "tiny", seed=0, max_positions=16)
    probe = NoiseProbe(examples[:6], steps=(1,))
    config = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=3, lr=1e-3,
                         device="cpu", progress=False)
    train(model, examples, config, callbacks=[probe])
    assert [p["step"] for p in probe.points] == [0, 1, 3]
    assert probe.points[0]["loss"] is None and probe.points[-1]["loss"] > 0
    final = sequence_noise_scale(model, examples[:6])
    assert probe.points[-1]["noise_scale"] == pytest.approx(final["noise_scale"], rel=1e-6)
