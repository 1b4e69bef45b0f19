"""Small parts: collation, schedules, metrics, task detection."""

import math

import pytest
import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.losses import count_items, detect_task
from accumlab.engine.metrics import accuracy, macro_f1, perplexity
from accumlab.engine.models import make_model
from accumlab.engine.schedules import lr_multiplier


def test_dynamic_padding_pads_to_the_longest_in_the_batch_only():
    batch = pad_collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
                         {"input_ids": [8], "labels": [8]}], pad_token_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    # after the causal shift: 2 + 0 label tokens
    assert count_items(batch["labels"], "causal_lm") == 2
    assert count_items(batch["labels"], "causal_lm", "samples") == 1
    multiple = pad_collate([{"input_ids": [1, 2, 3], "labels": 1}], pad_to_multiple_of=8)
    assert multiple["input_ids"].shape == (1, 8) and multiple["labels"].tolist() == [1]


def test_empty_collate_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        pad_collate([])


def test_schedules_count_optimizer_steps():
    f = [lr_multiplier(s, total_steps=10, warmup_steps=4, schedule="cosine") for s in range(10)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0) and f[-1] < 0.1
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    lin = [lr_multiplier(s, total_steps=6, schedule="linear", min_lr_ratio=0.1)
           for s in range(6)]
    assert lin[0] == 1.0 and lin[3] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(99, total_steps=10, schedule="constant") == 1.0


def test_metrics_on_a_fixed_example():
    preds, labels = [0, 1, 1, 2, 2, 2], [0, 1, 2, 2, 2, 1]
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # per class F1: c0 = 1, c1 = 2*1/(2+1+1) = 0.5, c2 = 2*2/(4+1+1) = 2/3
    assert macro_f1(preds, labels) == pytest.approx((1 + 0.5 + 2 / 3) / 3)
    assert perplexity(math.log(50)) == pytest.approx(50)
    assert perplexity(1e6) == math.inf
    with pytest.raises(ValueError):
        accuracy([], [])


def test_task_detection():
    assert detect_task(make_model("gpt2", "tiny")) == "causal_lm"
    assert detect_task(make_model("bert", "tiny")) == "classification"
    assert detect_task(make_model("bert", "tiny", task="masked_lm")) == "masked_lm"
    with pytest.raises(ValueError, match="task="):
        detect_task(torch.nn.Linear(2, 2))
