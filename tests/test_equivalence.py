"""Contract point 1 (and 6, 7): accumulated windows equal one large batch, in float64."""

import copy
import math

import pytest
import torch
from helpers import params_vector, random_cls_data, random_lm_data, rel_diff

import accumlab
from accumlab import MeanOfMeansWarning, TrainConfig
from accumlab.engine.collate import pad_collate
from accumlab.engine.losses import mean_loss
from accumlab.engine.models import make_model
from accumlab.engine.window import accumulate_gradients
from accumlab.lab.equivalence import (
    GradientComparison,
    compare_gradients,
    split_evenly,
    window_gradient,
)

KS = (1, 2, 4, 8)


def _gpt2():
    return make_model("gpt2", "tiny", seed=0, dtype=torch.float64)


def _bert():
    return make_model("bert", "tiny", seed=0, dtype=torch.float64, num_labels=3)


@pytest.mark.parametrize("make, data, task", [
    (_gpt2, random_lm_data(32, seed=1, max_len=25), "causal_lm"),
    (_bert, random_cls_data(32, seed=1), "classification"),
])
def test_float64_accumulated_gradient_equals_single_batch(make, data, task):
    model = make()
    single = window_gradient(model, data, 1, task=task, pad_token_id=1)
    assert single.norm() > 0
    for k in KS:
        accumulated = window_gradient(model, data, k, task=task, pad_token_id=1)
        assert rel_diff(accumulated, single) < 1e-12, k


@pytest.mark.parametrize("make, data", [
    (_gpt2, random_lm_data(32 * 20, seed=2, max_len=17)),
    (_bert, random_cls_data(32 * 20, seed=2)),
])
def test_float64_twenty_adamw_steps_match_single_batch(make, data):
    init = make()
    finals = {}
    for k in KS:
        model = copy.deepcopy(init)
        cfg = TrainConfig(micro_batch_size=32 // k, accum_steps=k, max_steps=20, lr=1e-3,
                          precision="fp64", progress=False, seed=3)
        result = accumlab.train(model, data, cfg)
        assert result.steps == 20
        finals[k] = params_vector(model)
    moved = rel_diff(finals[1], params_vector(init))
    assert moved > 1e-3  # the runs really trained
    for k in KS[1:]:
        assert rel_diff(finals[k], finals[1]) < 1e-10, k


def test_padded_variable_length_tokens_mode_equals_single_padded_batch():
    model = _gpt2()
    data = random_lm_data(24, seed=4, min_len=2, max_len=60, mask_prefix=True)
    counts = [sum(1 for t in d["labels"][1:] if t != -100) for d in data]
    assert max(counts) > 5 * max(1, min(counts))  # lengths really vary
    batch = pad_collate(data, pad_token_id=1)
    model.zero_grad()
    loss = mean_loss(model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits,
                     batch["labels"], "causal_lm")
    loss.backward()
    single = torch.cat([p.grad.flatten() for p in model.parameters()])
    tokens = window_gradient(model, data, 4, task="causal_lm", pad_token_id=1)
    assert rel_diff(tokens, single) < 1e-12
    with pytest.warns(MeanOfMeansWarning, match="unequal item counts"):
        mom = window_gradient(model, data, 4, task="causal_lm", pad_token_id=1,
                              normalization="mean_of_means")
    assert rel_diff(mom, single) > 1e-3


def test_mean_of_means_is_exact_when_counts_are_equal():
    model = _gpt2()
    data = [{"input_ids": d["input_ids"][:10], "labels": d["input_ids"][:10]}
            for d in random_lm_data(16, seed=5, min_len=10, max_len=20)]
    tokens = window_gradient(model, data, 4, task="causal_lm")
    mom = window_gradient(model, data, 4, task="causal_lm", normalization="mean_of_means")
    assert rel_diff(mom, tokens) < 1e-12


def test_samples_normalisation_is_exact_and_differs_from_tokens():
    model = _gpt2()
    data = random_lm_data(16, seed=6, min_len=2, max_len=40)
    single = window_gradient(model, data, 1, task="causal_lm", normalization="samples")
    for k in (2, 4):
        acc = window_gradient(model, data, k, task="causal_lm", normalization="samples")
        assert rel_diff(acc, single) < 1e-12
    tokens = window_gradient(model, data, 1, task="causal_lm")
    assert rel_diff(tokens, single) > 1e-3


def test_logged_loss_is_the_window_loss():
    model = _gpt2()
    data = random_lm_data(12, seed=7)
    batch = pad_collate(data, 1)
    with torch.no_grad():
        expected = float(mean_loss(model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).logits,
                                   batch["labels"], "causal_lm"))
    micro = [pad_collate(c, 1) for c in split_evenly(data, 4)]
    logged = accumulate_gradients(model, micro, task="causal_lm")
    assert math.isclose(logged, expected, rel_tol=1e-12)
    # not the last micro-batch times k
    last = micro[-1]
    with torch.no_grad():
        last_loss = float(mean_loss(model(input_ids=last["input_ids"],
                                          attention_mask=last["attention_mask"]).logits,
                                    last["labels"], "causal_lm"))
    assert not math.isclose(logged, 4 * last_loss, rel_tol=1e-3)


def test_model_loss_is_not_used_float64_stays_float64():
    # transformers' causal-LM loss upcasts to float32; accumlab's loss stays in float64
    model = _gpt2()
    data = random_lm_data(8, seed=8)
    batch = pad_collate(data, 1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert mean_loss(logits, batch["labels"], "causal_lm").dtype == torch.float64


def test_compare_gradients_table():
    model = make_model("gpt2", "tiny", seed=0)
    records = compare_gradients(model, random_lm_data(16, seed=9), ks=(1, 4),
                                precisions=("fp64", "fp32", "bf16"))
    assert [(r["precision"], r["k"]) for r in records] == [
        ("fp64", 1), ("fp64", 4), ("fp32", 1), ("fp32", 4), ("bf16", 1), ("bf16", 4)]
    by = {(r["precision"], r["k"]): r for r in records}
    assert by[("fp64", 4)]["vs_single"] < 1e-12
    assert 1e-9 < by[("fp32", 4)]["vs_fp64"] < 1e-4
    assert by[("bf16", 4)]["single_vs_fp64"] > by[("fp32", 4)]["single_vs_fp64"]
    # the caller's model is untouched (float32, no gradients)
    assert next(model.parameters()).dtype == torch.float32
    assert all(p.grad is None for p in model.parameters())


def test_gradient_comparison_keeps_the_reference_and_single_batches():
    """What the lesson 03 panel relies on: records equal compare_gradients', and a new k
    costs one window gradient once the reference and the single batch are known."""
    model = make_model("gpt2", "tiny", seed=0)
    data = random_lm_data(8, seed=11, max_len=12)
    comparison = GradientComparison(model, data, pad_token_id=1)
    assert comparison.pending("fp32", 2) == 3
    messages = []
    first = comparison.record("fp32", 2, progress=messages.append)
    assert [m.split(":")[0] for m in messages] == [
        "gradient 1 of 3", "gradient 2 of 3", "gradient 3 of 3"]
    assert "float64" in messages[0] and "fp32" in messages[1]
    assert comparison.pending("fp32", 4) == 1 and comparison.pending("fp32", 2) == 0
    assert comparison.pending("bf16", 4) == 2
    messages.clear()
    comparison.record("fp32", 4, progress=messages.append)
    assert messages == ["gradient 1 of 1: 4 accumulated micro-batches in fp32"]
    expected = compare_gradients(model, data, ks=(2, 4), precisions=("fp32",), pad_token_id=1)
    assert [first, comparison.records[("fp32", 4)]] == expected  # deterministic on a CPU
    comparison.forget("fp32")
    assert comparison.pending("fp32", 8) == 2 and comparison.pending("fp32", 4) == 0


def test_gradients_accumulate_in_float32_under_bf16_autocast():
    model = make_model("gpt2", "tiny", seed=0)
    batch = pad_collate(random_lm_data(4, seed=10), 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"]).logits
    assert logits.dtype == torch.bfloat16
    accumulate_gradients(model, [batch, batch], task="causal_lm", forward=_bf16_forward)
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())


def _bf16_forward(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=batch["input_ids"],
                     attention_mask=batch["attention_mask"]).logits


def test_equivalence_table_script_prints_the_reference_rows(tmp_path):
    """benchmarks/equivalence_table.py, which regenerates lesson 03's GPU reference, on a CPU."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "equivalence_table.py"
    out = tmp_path / "table.txt"
    run = subprocess.run([sys.executable, str(script), "--size", "tiny", "--seq-len", "8",
                          "--examples", "8", "--k", "2", "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("CPU, GPT-2 tiny") and "k = 2" in lines[0]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in lines[2:]}
    assert list(rows) == ["fp32", "bf16", "fp16"]
    for vs_single, own, ratio in rows.values():
        assert 0 < vs_single and 0 < own and ratio == pytest.approx(vs_single / own, abs=0.01)
