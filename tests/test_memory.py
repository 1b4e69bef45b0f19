"""accumlab.memory: the analytic model, the CPU measurement and the planner."""

import pytest
import torch

from accumlab import memory
from accumlab.collate import pad_collate
from accumlab.models import count_parameters, make_model

GIB = memory.GIB


@pytest.mark.parametrize("size", ["tiny", "mini", "small"])
def test_parameter_formula_matches_real_gpt2(size):
    assert memory.ModelShape.gpt2(size).parameters == count_parameters(make_model("gpt2", size))


def test_gpt2_small_has_its_known_parameter_count():
    shape = memory.ModelShape.gpt2("gpt2-small")
    assert (shape.layers, shape.hidden, shape.heads, shape.vocab, shape.positions) == \
        (12, 768, 12, 50257, 1024)
    assert shape.parameters == 124_439_808  # GPT2LMHeadModel(GPT2Config()), tied embeddings


def test_unknown_size_and_precision_are_named():
    with pytest.raises(ValueError, match="unknown model size"):
        memory.ModelShape.gpt2("huge")
    with pytest.raises(ValueError, match="precision"):
        memory.model_state_bytes(10, "int8")
    with pytest.raises(ValueError, match="optimizer"):
        memory.model_state_bytes(10, "fp32", "lion")
    with pytest.raises(ValueError, match="positions"):
        memory.estimate_memory(memory.ModelShape.gpt2("tiny"), 1, 4096)


@pytest.mark.parametrize("precision, per_param", [("fp32", 16), ("bf16", 16), ("fp16", 16),
                                                  ("fp64", 32)])
def test_adamw_states_are_16_bytes_per_parameter(precision, per_param):
    parts = memory.model_state_bytes(1000, precision, "adamw")
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == per_param * 1000
    assert parts["weight_copies"] == (2000 if precision in ("bf16", "fp16") else 0)
    assert memory.model_state_bytes(1000, precision, "sgd")["optimizer"] == 0


def test_activations_follow_korthikanti():
    shape = memory.ModelShape.gpt2("gpt2-small")
    s, b, h, a, L = 1024, 1, 768, 12, 12
    assert memory.activation_bytes(shape, b, s, "bf16") == L * s * b * h * (34 + 5 * a * s // h)
    assert memory.activation_bytes(shape, b, s, "bf16", attention="fused") == L * s * b * h * 34
    assert memory.activation_bytes(shape, b, s, "bf16", dropout=False) == \
        L * (32 * s * b * h + 2 * a * s * s * b)
    assert memory.activation_bytes(shape, b, s, "fp32") == 2 * memory.activation_bytes(
        shape, b, s, "bf16")
    # linear in the micro-batch, faster than linear in the sequence length (eager)
    assert memory.activation_bytes(shape, 4, 512) == 4 * memory.activation_bytes(shape, 1, 512)
    assert memory.activation_bytes(shape, 1, 1024) > 2 * memory.activation_bytes(shape, 1, 512)
    with pytest.raises(ValueError, match="attention"):
        memory.activation_bytes(shape, 1, 8, attention="flash")


def test_logits_bytes():
    shape = memory.ModelShape.gpt2("tiny")
    bsv = 2 * 8 * shape.vocab
    assert memory.logits_bytes(shape, 2, 8, "bf16") == bsv * (2 + 4 + 4)
    assert memory.logits_bytes(shape, 2, 8, "fp32") == bsv * 8
    assert memory.logits_bytes(shape, 2, 8, "fp64") == bsv * 16
    assert memory.logits_bytes(shape, 2, 8, "bf16", saved_only=True) == bsv * 4


def test_formula_is_a_lower_bound_of_the_h100_reference():
    ref = memory.REFERENCE_H100_GPT2_SMALL
    shape = memory.ModelShape.gpt2(ref["size"])
    for b, measured in ref["peak_gib"].items():
        est = memory.estimate_memory(shape, b, ref["seq_len"], ref["precision"],
                                     attention=ref["attention"])
        assert est["total"] / GIB < measured, b
        parts = ("weights", "gradients", "optimizer", "weight_copies", "activations", "logits")
        assert est["total"] == sum(est[k] for k in parts)


def test_fit_linear_predicts_the_reference_out_of_memory():
    ref = memory.REFERENCE_H100_GPT2_SMALL
    sizes = sorted(ref["peak_gib"])
    fit = memory.fit_linear(sizes, [ref["peak_gib"][b] for b in sizes])
    assert fit["max_relative_residual"] < 0.02
    for b in ref["out_of_memory"]:
        assert fit["fixed"] + b * fit["per_sequence"] > ref["gpu_gib"]
    largest = memory.largest_fitting(fit, ref["gpu_gib"])
    assert max(sizes) <= largest < min(ref["out_of_memory"])
    exact = memory.fit_linear([1, 2, 4], [3.0, 5.0, 9.0])
    assert exact["fixed"] == pytest.approx(1.0) and exact["per_sequence"] == pytest.approx(2.0)
    assert memory.largest_fitting(exact, 10.0) == 4
    with pytest.raises(ValueError, match="two or more"):
        memory.fit_linear([2, 2], [1.0, 1.0])
    attn = memory.REFERENCE_H100_ATTENTION
    assert all(attn["eager"][b] > attn["sdpa"][b] for b in attn["sdpa"])


def test_largest_micro_batch_is_the_boundary():
    shape = memory.ModelShape.gpt2("gpt2-small")
    b = memory.largest_micro_batch(shape, 1024, 80 * GIB, "bf16")
    assert memory.fits(memory.estimate_memory(shape, b, 1024, "bf16")["total"], 80)
    assert not memory.fits(memory.estimate_memory(shape, b + 1, 1024, "bf16")["total"], 80)
    assert memory.largest_micro_batch(shape, 1024, 1 * GIB, "bf16") == 0  # states alone: >1 GiB


@pytest.mark.parametrize("target, most, ranks, expected", [
    (256, 12, 1, (8, 32)), (256, 256, 1, (256, 1)), (96, 40, 1, (32, 3)), (7, 4, 1, (1, 7)),
    (256, 16, 4, (16, 4)),
])
def test_plan_accumulation_keeps_the_effective_batch(target, most, ranks, expected):
    plan = memory.plan_accumulation(target, most, ranks)
    assert (plan["micro_batch"], plan["accum_steps"]) == expected
    assert plan["effective_batch"] == target and plan["micro_batch"] <= most


def test_plan_accumulation_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of ranks"):
        memory.plan_accumulation(10, 4, ranks=3)
    with pytest.raises(ValueError):
        memory.plan_accumulation(0, 4)


def _batch(b, s, vocab=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (b, s), generator=g).tolist()
    return pad_collate([{"input_ids": i, "labels": i} for i in ids], 1)


def test_saved_activation_bytes_is_exact_and_linear():
    model = make_model("gpt2", "tiny", attn_implementation="eager")
    one = memory.saved_activation_bytes(model, _batch(2, 32), "fp32")
    again = memory.saved_activation_bytes(model, _batch(2, 32, seed=1), "fp32")
    two = memory.saved_activation_bytes(model, _batch(4, 32), "fp32")
    assert one == again  # deterministic: depends on shapes only
    assert one["logits"] == 2 * 31 * 4096 * 4  # float32 log-probabilities after the shift
    assert two["logits"] == 2 * one["logits"]
    assert 1.9 < two["total"] / one["total"] < 2.1
    assert one["total"] == one["logits"] + one["layers"]
    # parameters are not counted: a twice-wider vocabulary changes only the logits part
    assert not any(p.grad is not None for p in model.parameters())


def test_measure_training_memory_on_cpu_counts_the_real_states():
    model = make_model("gpt2", "tiny")
    n = count_parameters(model)
    result = memory.measure_training_memory(model, _batch(2, 16), "fp32")
    assert result["method"] == "saved_tensors"
    assert result["weights"] == 4 * n and result["gradients"] == 4 * n
    assert result["optimizer"] == 8 * n  # AdamW: two float32 moments
    assert result["peak"] == 16 * n + result["activations"]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_measure_training_memory_on_cuda_reads_the_peak():
    model = make_model("gpt2", "tiny").cuda()
    small = memory.measure_training_memory(model, _batch(2, 64), "bf16")
    big = memory.measure_training_memory(model, _batch(8, 64), "bf16")
    assert small["method"] == "cuda_peak"
    assert small["peak"] >= small["weights"] + small["gradients"] + small["optimizer"]
    assert big["peak"] > small["peak"]
