"""Fine-tuning from the shipped checkpoint (issue 7), masked-LM examples, classification metrics."""

import copy
import json

import pytest
import torch

from accumlab.data.corpus import lm_examples
from accumlab.data.mlm import MASK_ID, MaskedLMDataset, add_mask_token, mask_tokens
from accumlab.data.textclass import classification_examples
from accumlab.data.tokenizer import load_tokenizer
from accumlab.engine.checkpoint import load_weights
from accumlab.engine.collate import pad_collate
from accumlab.engine.evaluation import evaluate
from accumlab.engine.losses import IGNORE_INDEX
from accumlab.engine.metrics import accuracy, macro_f1
from accumlab.engine.models import load_model
from accumlab.lab.finetune import classifier, finetune, pretrained_dir, seed_train_epoch

# CI-sized fine-tuning run at the seed's effective batch of 64 (32 x 2): 512 examples of at most
# 64 tokens, 4 epochs = 32 optimizer steps, peak lr 2e-3 (the notebook's). Measured for issue 7
# with the shipped checkpoint: dev / test accuracy 0.720 / 0.747 from it, 0.497 / 0.497 from a
# random start (about 45 s for both runs on one busy core).
CI_TRAIN, CI_EPOCHS, CI_LR, CI_MICRO, CI_K = 512, 4, 2e-3, 32, 2
CLEAR_GAIN = 0.1  # accuracy points the pretrained start must gain, on dev and on test


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def splits(tok):
    torch.set_num_threads(1)
    return {s: classification_examples(tok, s, max_length=64,
                                       limit=CI_TRAIN if s == "train" else None)
            for s in ("train", "dev", "test")}


# ------------------------------------------------------------------ masked-LM examples


def test_mask_tokens_rates_labels_and_specials():
    g = torch.Generator().manual_seed(0)
    ids = [5 + (i % 4000) for i in range(20000)] + [0, 1] * 50
    masked, labels = mask_tokens(ids, generator=g)
    selected = [i for i, y in enumerate(labels) if y != IGNORE_INDEX]
    rate = len(selected) / 20000
    assert 0.14 < rate < 0.16
    assert all(labels[i] == ids[i] for i in selected)  # labels are the original tokens
    assert all(masked[i] == ids[i] for i, y in enumerate(labels) if y == IGNORE_INDEX)
    assert all(labels[i] == IGNORE_INDEX for i in range(20000, len(ids)))  # specials untouched
    to_mask = sum(masked[i] == MASK_ID for i in selected) / len(selected)
    kept = sum(masked[i] == ids[i] for i in selected) / len(selected)
    assert 0.77 < to_mask < 0.83
    assert 0.08 < kept < 0.12  # (plus random ids that happen to equal the original: ~0)
    assert max(masked) <= MASK_ID and min(masked) >= 0


def test_mask_tokens_selects_at_least_one():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        _, labels = mask_tokens([7, 8, 0], generator=g)
        assert sum(y != IGNORE_INDEX for y in labels) >= 1
        assert labels[2] == IGNORE_INDEX


def test_masked_dataset_is_deterministic_and_collates():
    examples = [{"input_ids": list(range(2, 2 + n)), "labels": list(range(2, 2 + n))}
                for n in (10, 30, 50, 70)]
    a, b = MaskedLMDataset(examples, seed=3), MaskedLMDataset(examples, seed=3)
    assert [a[i] for i in range(4)] == [b[i] for i in range(4)]
    assert a[2] == a[2]
    b.set_epoch(1)
    assert [a[i] for i in range(4)] != [b[i] for i in range(4)]
    r = MaskedLMDataset(examples, seed=3, repeats=2)
    assert len(r) == 8 and r[5] == b[1] and r[1] == a[1]
    batch = pad_collate([a[i] for i in range(4)], pad_token_id=1)
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 70)
    assert (batch["labels"][0, 10:] == IGNORE_INDEX).all()  # padding carries no label
    with pytest.raises(IndexError):
        a[4]


def test_mask_token_added_to_tokenizer(tok):
    t = add_mask_token(copy.deepcopy(tok))
    assert t.mask_token == "[MASK]" and t.mask_token_id == MASK_ID


# ------------------------------------------------------------------ metrics on a fixed example


def test_classification_metrics_fixed_example():
    preds = [0, 0, 1, 1, 2, 3, 3, 3]
    labels = [0, 1, 1, 1, 2, 2, 3, 0]
    assert accuracy(preds, labels) == 5 / 8
    # per class F1 = 2tp / (2tp + fp + fn): 0: 2/4, 1: 4/5, 2: 2/3, 3: 2/4
    assert macro_f1(preds, labels) == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 1 / 2) / 4)


# ------------------------------------------------------------------ the shipped checkpoint


def test_shipped_checkpoint_is_small_and_loads(tok):
    folder = pretrained_dir()
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size < 8 * 2**20
    info = json.loads((folder / "pretrain_info.json").read_text())
    assert info["validation_loss_after"] < info["validation_loss_before"] - 3
    assert info["validation_loss_after"] < 5.0  # perplexity under 150 on the corpus
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    t = AutoTokenizer.from_pretrained(folder)
    assert t("def f")["input_ids"] == tok("def f")["input_ids"]
    auto = AutoModelForMaskedLM if info["arch"] == "bert" else AutoModelForCausalLM
    lm = auto.from_pretrained(folder)
    assert lm.config.vocab_size == len(t)


def test_shipped_checkpoint_has_the_validation_loss_its_datasheet_states(tok):
    info = json.loads((pretrained_dir() / "pretrain_info.json").read_text())
    if info["arch"] != "gpt2":
        pytest.skip("the masked-LM loss depends on the random masks; checked for the causal LM")
    lm = load_model(str(pretrained_dir()), task="causal_lm")
    val = lm_examples(tok, "validation", max_length=info["max_length"])
    loss = evaluate(lm, val, task="causal_lm", batch_size=64, pad_token_id=1)["loss"]
    assert loss == pytest.approx(info["validation_loss_after"], rel=1e-4)


# ------------------------------------------------------------------ fine-tuning


@pytest.fixture(scope="module")
def ci_runs(splits, tmp_path_factory):
    runs = {}
    for start in ("pretrained", "random"):
        folder = tmp_path_factory.mktemp(start)
        model = classifier(start, seed=0)
        runs[start] = finetune(model, splits["train"], splits["dev"], splits["test"],
                               micro_batch_size=CI_MICRO, accum_steps=CI_K,
                               epochs=CI_EPOCHS, lr=CI_LR,
                               patience=None, checkpoint_dir=str(folder))
    return runs


def test_finetune_from_pretrained_beats_chance_on_test(ci_runs):
    run = ci_runs["pretrained"]
    assert run["effective_batch"] == 64 and run["steps"] == CI_EPOCHS * CI_TRAIN // 64
    assert len(run["dev_curve"]) == CI_EPOCHS  # evaluated once per epoch
    assert run["test"]["accuracy"] >= 0.6  # chance is 0.25
    assert run["best"]["accuracy"] == max(c["accuracy"] for c in run["dev_curve"])


def test_pretrained_start_beats_random_start_clearly(ci_runs):
    pre, rnd = ci_runs["pretrained"], ci_runs["random"]
    assert pre["best"]["accuracy"] > rnd["best"]["accuracy"] + CLEAR_GAIN  # dev
    assert pre["test"]["accuracy"] > rnd["test"]["accuracy"] + CLEAR_GAIN
    assert pre["test"]["f1"] > rnd["test"]["f1"] + CLEAR_GAIN


def test_best_checkpoint_reproduces_dev_score(ci_runs, splits):
    run = ci_runs["pretrained"]
    fresh = classifier("random", seed=123)
    state = load_weights(run["checkpoint"], fresh)
    assert state["step"] == run["best_step"]
    again = evaluate(fresh, splits["dev"], task="classification", batch_size=32, pad_token_id=1)
    assert again["accuracy"] == run["best"]["accuracy"]
    assert again["f1"] == pytest.approx(run["best"]["f1"], abs=1e-12)
    assert again["loss"] == pytest.approx(run["best"]["loss"], rel=1e-5)


def test_seed_train_epoch_changes_nothing(splits):
    model = classifier("pretrained", seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seed_train_epoch(model, splits["train"][:64], 16, opt, 2,
                     collate_fn=lambda b: pad_collate(b, pad_token_id=1))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
