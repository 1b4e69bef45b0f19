"""The backend of lesson 12 (the seed article's errata): each computed answer can come out wrong.

Claims 1-2: a window of k micro-batches has the law of one batch of b·k (mean and covariance),
its spread falls as 1/(k·b) and E|G_B|² = |G|² + tr Σ/B. FAQ: clipping bounds a spike and
accumulation does not; the training loss ignores the generation temperature; FLOPs per token do
not depend on the batch. Code: `from transformers import AdamW` fails; index labels give the
one-hot cross-entropy. Claim 13: ZeRO's per-rank bytes reproduce the paper's worked example.
"""

import pytest
import torch
import torch.nn.functional as F

from accumlab.data.textclass import LABELS, classification_examples
from accumlab.data.tokenizer import load_tokenizer
from accumlab.engine.collate import pad_collate
from accumlab.engine.models import make_model
from accumlab.lab import errata, errata_runs, throughput
from accumlab.lab.memory import ModelShape
from accumlab.lab.noise import BagOfWordsClassifier, exact_noise_scale
from tests.helpers import random_cls_data, random_lm_data


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and kinder to a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool():
    """A bag-of-words classifier (float64) and 128 real labelled examples."""
    tokenizer = load_tokenizer()
    examples = classification_examples(tokenizer, "train", max_length=48, limit=128)
    model = BagOfWordsClassifier(len(tokenizer), len(LABELS), seed=0).double()
    return model, examples


@pytest.fixture(scope="module")
def distribution(pool):
    model, examples = pool
    return errata.gradient_distribution(model, examples, 2, (1, 8), 120, seed=3)


def test_exact_moments_agree_with_the_noise_module(pool):
    model, examples = pool
    mine = errata.exact_gradient_moments(model, examples)
    theirs = exact_noise_scale(model, examples)
    assert mine["grad_sq"] == pytest.approx(theirs["grad_sq"], rel=1e-10)
    assert mine["trace_sigma"] == pytest.approx(theirs["trace_sigma"], rel=1e-10)
    assert float(mine["direction"].norm()) == pytest.approx(1.0)


def test_accumulated_window_has_the_mean_and_variance_of_one_big_batch(distribution):
    for row in distribution["rows"]:
        # |mean_acc - mean_one|^2 against its expectation when both laws are equal
        assert row["mean_gap_ratio"] < 4, row
        for who in ("accumulated", "one batch"):
            assert row[f"variance {who}"] == pytest.approx(row["variance predicted"], rel=0.2)
            assert row[f"mean_sq {who}"] == pytest.approx(row["mean_sq predicted"], rel=0.2)


def test_variance_falls_as_one_over_k_times_b(distribution):
    small, big = distribution["rows"]  # B = 2 and B = 16
    assert big["B"] / small["B"] == 8
    ratio = small["variance accumulated"] / big["variance accumulated"]
    assert 8 / 1.4 < ratio < 8 * 1.4
    # E|G_B|^2 keeps the floor |G|^2: it does not fall by 8
    floor = distribution["truth"]["grad_sq"]
    assert big["mean_sq accumulated"] > floor
    assert small["mean_sq accumulated"] / big["mean_sq accumulated"] < ratio


def test_the_mean_gap_statistic_sees_different_laws(pool):
    """The check above has power: windows from a different pool give a large gap ratio."""
    model, examples = pool
    truth = errata.exact_gradient_moments(model, examples)
    a = errata.window_gradient_samples(model, examples, 4, 2, 40, seed=0)
    other = [e for e in examples if e["labels"] == examples[0]["labels"]]  # one class only
    b = errata.window_gradient_samples(model, other, 8, 1, 40, seed=1)
    gap = float((a["mean"] - b["mean"]).pow(2).sum())
    assert gap / (2 * truth["trace_sigma"] / 8 / 40) > 20


def test_window_samples_reject_bad_sizes(pool):
    model, examples = pool
    with pytest.raises(ValueError, match="windows"):
        errata.window_gradient_samples(model, examples, 2, 2, 1)


def test_clipping_bounds_a_spike_and_accumulation_does_not():
    model = make_model("gpt2", "tiny", seed=0, max_positions=32)
    data = random_lm_data(16, seed=1, min_len=12, max_len=13)  # equal counts: N = k * n_1
    micro = [pad_collate(data[2 * j:2 * j + 2]) for j in range(8)]
    out = errata.spike_update_norms(model, micro, spike=1000.0, clip=0.5, lr=1.0)
    ks = [r["k"] for r in out["rows"]]
    assert ks == [1, 2, 4, 8]
    for r in out["rows"]:
        assert r["clipped"] <= 0.5 * (1 + 1e-5)
        assert r["unclipped"] > 10 * out["normal"]
    # accumulation only divides the spike by k
    norms = [r["unclipped"] for r in out["rows"]]
    for a, b in zip(norms, norms[1:]):
        assert a / b == pytest.approx(2.0, rel=0.1)


def test_training_loss_ignores_the_generation_temperature():
    model = make_model("gpt2", "tiny", seed=0, max_positions=32)
    batch = pad_collate(random_lm_data(4, seed=2, min_len=10, max_len=20))
    rows = errata.loss_by_generation_temperature(model, batch, (0.3, 1.0, 3.0))["rows"]
    losses = [r["training loss"] for r in rows]
    assert losses[0] == losses[1] == losses[2]
    entropies = [r["sampling entropy"] for r in rows]
    assert entropies[0] < entropies[1] < entropies[2]  # what temperature does change
    with pytest.raises(ValueError):
        errata.loss_by_generation_temperature(model, batch, (0.0,))


def test_flops_per_token_do_not_depend_on_the_batch():
    model = make_model("gpt2", "tiny", seed=0, max_positions=32)
    rows = errata.flops_per_token_by_batch(model, 32, (1, 3, 8))
    per_token = [r["flops per token"] for r in rows]
    assert per_token[0] > 0
    assert per_token[0] == pytest.approx(per_token[1], rel=1e-12)
    assert per_token[0] == pytest.approx(per_token[2], rel=1e-12)
    formula = throughput.flops_per_token(*throughput.model_shape(model), 32)
    assert per_token[0] == pytest.approx(formula, rel=0.1)


def test_adamw_is_gone_from_transformers_and_torch_has_it():
    message = errata.import_error("transformers", "AdamW")
    assert message is not None and message.startswith("ImportError")
    assert errata.import_error("torch.optim", "AdamW") is None
    with pytest.raises(ValueError):
        errata.import_error("transformers; import os", "AdamW")


def test_index_labels_give_the_one_hot_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([[0], [3], [1], [1], [2], [0]])  # the seed's shape: (batch, 1)
    expected = F.cross_entropy(logits, labels.reshape(-1))
    assert float(errata.one_hot_cross_entropy(logits, labels)) == pytest.approx(
        float(expected), rel=1e-12)
    wrong = F.cross_entropy(logits, torch.roll(labels.reshape(-1), 1))
    assert float(errata.one_hot_cross_entropy(logits, labels)) != pytest.approx(float(wrong))


def test_a_transformers_classifier_takes_the_seeds_label_shape():
    model = make_model("bert", "tiny", seed=0, num_labels=3, max_positions=32)
    batch = pad_collate(random_cls_data(5, seed=4, num_labels=3))
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        column = model(input_ids=batch["input_ids"], labels=batch["labels"][:, None]).loss
    assert float(flat) == pytest.approx(float(column), rel=1e-6)


def test_zero_stages_reproduce_the_papers_example():
    """ZeRO paper, figure 1: 7.5B parameters on 64 GPUs, K = 12."""
    gb = {k: v / 1e9 for k, v in errata.zero_model_state_bytes(7_500_000_000, 64).items()}
    assert gb["baseline"] == pytest.approx(120.0)
    assert gb["zero1"] == pytest.approx(31.4, abs=0.05)
    assert gb["zero2"] == pytest.approx(16.6, abs=0.05)
    assert gb["zero3"] == pytest.approx(1.875)
    one = errata.zero_model_state_bytes(1000, 1)
    assert len(set(one.values())) == 1  # one rank shards nothing
    with pytest.raises(ValueError):
        errata.zero_model_state_bytes(1000, 0)


def test_model_sizes_of_the_zero_table():
    assert errata.LLAMA2_7B.parameters == 6_738_415_616  # Llama 2 7B's published count
    assert ModelShape.named("gpt2-small").parameters == 124_439_808


def test_pipeline_bubble_shrinks_with_more_micro_batches():
    assert errata.pipeline_bubble_fraction(4, 1) == pytest.approx(0.75)
    assert errata.pipeline_bubble_fraction(4, 12) == pytest.approx(0.2)
    assert errata.pipeline_bubble_fraction(1, 3) == 0
    with pytest.raises(ValueError):
        errata.pipeline_bubble_fraction(0, 3)


def test_one_accumulated_step_is_one_big_step_not_k_small_ones():
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64, max_positions=32)
    out = errata_runs.one_step_vs_small_steps(model, random_lm_data(8, seed=5), 2, 4, 0.1)
    assert out["accumulated_vs_one_batch"] < 1e-12
    assert out["accumulated_vs_small_steps"] > 0.1
    with pytest.raises(ValueError, match="examples"):
        errata_runs.one_step_vs_small_steps(model, random_lm_data(3), 2, 4, 0.1)


def test_window_throughput_returns_one_record_per_setting():
    model = make_model("gpt2", "tiny", seed=0, max_positions=32)
    blocks = [{"input_ids": d["input_ids"][:8], "labels": d["labels"][:8]}
              for d in random_lm_data(8, seed=6, min_len=8, max_len=9)]
    out = errata_runs.window_throughput(model, blocks, [(2, 1), (2, 2), (1, 4)], rounds=2)
    assert [(r["micro_batch"], r["accum_steps"], r["batch"]) for r in out] == \
        [(2, 1, 2), (2, 2, 4), (1, 4, 4)]
    assert all(len(r["per_round"]) == 2 and r["tokens_per_s"] > 0 for r in out)
    with pytest.raises(ValueError, match="blocks"):
        errata_runs.window_throughput(model, blocks, [(4, 4)], rounds=1)


def test_items_per_update_is_b_times_k():
    model = make_model("bert", "tiny", seed=0, num_labels=3, max_positions=48)
    data = random_cls_data(30, seed=7, num_labels=3)
    assert errata_runs.items_per_update(model, data, 4, 3, steps=2) == [12, 12]


def test_figures_carry_the_numbers(distribution):
    from accumlab.ui import errata_figures

    fig = errata_figures.gradient_law_figure(distribution)
    acc = [t for t in fig.data if t.name.endswith("(accumulated)")][0]
    assert list(acc.y) == [r["variance accumulated"] for r in distribution["rows"]]
    hist = errata_figures.projection_histogram(distribution, 8)
    assert len(hist.data) == 2
    assert list(hist.data[0].x) == distribution["samples"][8]["accumulated"]["along"]
