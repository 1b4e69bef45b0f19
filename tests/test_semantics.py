"""The framework semantics side by side (accumlab.lab.semantics): the measured facts.

22 padded variable-length examples, micro 2 x k 4 (windows of 4, 4, 3 micro-batches), SGD,
fp32 on CPU; each update against the exact update of its window from the same parameters.
Measured (transformers 5.24, accelerate 1.15): accumlab and the Trainer's num_items_in_batch
path within 4e-7; mean-of-means 0.34-0.52 away; the unshifted count 4.5-5.4e-2 away with
norm ratio n / (n + rows); Accelerate's short window scaled by 3/4. The adapters of
accumlab.integrations (ExactTrainer on the stock GPT-2, AccelerateWindows) as exact as
accumlab; BERT classification: the plain Trainer x3, x3, x1 on windows of 3, 3, 1.
"""

import pytest

pytest.importorskip("accelerate")

from accumlab.integrations import AccelerateWindows, ExactTrainer  # noqa: E402
from accumlab.lab import semantics  # noqa: E402

EXACT = 1e-5  # fp32 rounding of p + lr * g; measured 2e-7 .. 4e-7


@pytest.fixture(scope="module")
def results():
    return semantics.side_by_side(exact_trainer=ExactTrainer,
                                  accelerate_windows=AccelerateWindows)


def _rel(results, name):
    return [r["rel_diff"] for r in results[name]]


def test_every_framework_steps_once_per_window_including_the_short_one(results):
    for name, records in results.items():
        assert [r["micro_batches"] for r in records] == [4, 4, 3], name


def test_accumlab_and_the_trainer_num_items_path_are_exact(results):
    for name in ("accumlab", "trainer"):
        assert max(_rel(results, name)) < EXACT, (name, _rel(results, name))


def test_the_adapters_are_exact_where_their_plain_frameworks_are_not(results):
    # ExactTrainer runs the stock GPT-2 (loss_type None) that the plain Trainer counts wrong
    for adapter, plain in (("trainer_exact", "trainer_unshifted_count"),
                           ("accelerate_windows", "accelerate")):
        assert max(_rel(results, adapter)) < EXACT, (adapter, _rel(results, adapter))
        assert min(_rel(results, plain)) > 1e-2, (plain, _rel(results, plain))
        assert [r["norm_ratio"] for r in results[adapter]] == pytest.approx([1, 1, 1], abs=1e-5)


def test_bert_classification_plain_trainer_sums_micro_batch_means():
    from accumlab.integrations import ExactTrainer

    bert = semantics.bert_side_by_side(ExactTrainer)
    assert [r["micro_batches"] for r in bert["trainer"]] == [3, 3, 1]
    # each window's update is its micro-batch count times the exact one (#47688)
    assert [r["norm_ratio"] for r in bert["trainer"]] == pytest.approx([3, 3, 1], rel=1e-5)
    for name in ("trainer_exact", "accumlab"):
        assert max(_rel(bert, name)) < EXACT, (name, _rel(bert, name))
    assert len(semantics.format_side_by_side(bert, semantics.BERT_EXPLANATIONS)) == 6


def test_mean_of_means_is_far_from_exact_on_padded_data(results):
    # the Trainer without loss kwargs and Accelerate's accumulate() loop both average means
    for name in ("trainer_mean_loss", "accelerate"):
        assert min(_rel(results, name)) > 0.1, (name, _rel(results, name))
    # in the full windows both divide by 4: the very same update
    for a, b in zip(results["trainer_mean_loss"][:2], results["accelerate"][:2]):
        assert a["rel_diff"] == pytest.approx(b["rel_diff"], rel=1e-4)
    # in the short window the Trainer divides by its 3 micro-batches, Accelerate by K = 4
    short_trainer, short_accel = results["trainer_mean_loss"][2], results["accelerate"][2]
    assert short_accel["norm_ratio"] / short_trainer["norm_ratio"] == pytest.approx(3 / 4,
                                                                                     rel=1e-4)


def test_counting_labels_before_the_shift_shrinks_every_update_by_n_over_n_plus_rows(results):
    for name in ("trainer_unshifted_count", "accelerate_num_items"):
        for rec in results[name]:
            n = sum(rec["items"])
            rows = semantics.MICRO * rec["micro_batches"]
            assert rec["norm_ratio"] == pytest.approx(n / (n + rows), rel=1e-4), (name, rec)
            assert rec["rel_diff"] == pytest.approx(rows / (n + rows), rel=1e-3)


def test_every_framework_has_an_explanation_citing_issues(results):
    assert set(results) == set(semantics.EXPLANATIONS)
    for name, text in semantics.EXPLANATIONS.items():
        if name != "accumlab":
            assert "#" in text, name
    lines = semantics.format_side_by_side(results)
    assert len(lines) == 2 * len(results)


def test_a_framework_that_skips_the_short_window_is_reported():
    from accumlab.engine.models import make_model

    init = make_model("gpt2", "tiny", seed=0)
    data = semantics.padded_lm_examples()
    after = semantics.accumlab_steps(init, data, partial_window="drop")
    with pytest.raises(ValueError, match="did not step once per window"):
        semantics.compare_to_exact(make_model("gpt2", "tiny", seed=0), data, after)
