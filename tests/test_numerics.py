"""accumlab.lab.numerics: float formats, underflow, loss scaling and 16-bit .grad, against fp64."""

import math

import pytest
import torch
from helpers import random_lm_data

from accumlab.engine.collate import pad_collate
from accumlab.engine.models import make_model
from accumlab.lab import numerics


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return make_model("gpt2", "tiny", seed=0)


@pytest.fixture(scope="module")
def one_batch():
    return pad_collate(random_lm_data(2, seed=3, min_len=12, max_len=20), 0)


def test_format_facts_match_the_ieee_and_bfloat16_layouts():
    facts = {r["format"]: r for r in numerics.format_facts(("fp64", "fp32", "bf16", "fp16"))}
    assert (facts["fp16"]["exponent_bits"], facts["fp16"]["mantissa_bits"]) == (5, 10)
    assert (facts["bf16"]["exponent_bits"], facts["bf16"]["mantissa_bits"]) == (8, 7)
    assert (facts["fp32"]["exponent_bits"], facts["fp32"]["mantissa_bits"]) == (8, 23)
    assert (facts["fp64"]["exponent_bits"], facts["fp64"]["mantissa_bits"]) == (11, 52)
    assert facts["fp16"]["max"] == 65504.0
    assert facts["fp16"]["smallest_normal"] == 2.0**-14
    assert facts["fp16"]["smallest_subnormal"] == 2.0**-24
    assert facts["bf16"]["smallest_subnormal"] == 2.0**-133
    assert facts["bf16"]["smallest_normal"] == facts["fp32"]["smallest_normal"] == 2.0**-126
    with pytest.raises(ValueError, match="unknown format"):
        numerics.format_facts(("fp8",))


def test_underflow_fraction_on_a_hand_made_tensor():
    reference = torch.tensor([1.0, 1e-3, 0.0, 5.0, -2e-9])
    values = torch.tensor([0.0, 1e-3, 0.0, 5.0, 0.0])
    # non-zero in the reference: 4 entries; of those, entries 0 and 4 became zero
    assert numerics.underflow_fraction(values, reference) == 0.5
    assert numerics.underflow_fraction(reference, reference) == 0.0
    # a real fp16 cast rounds what is below half the smallest subnormal 2**-24 to zero
    small = torch.tensor([1e-8, 1e-7, 1e-4, 2.9e-8, 3.0e-8])  # 3e-8 > 2**-25 rounds up
    assert numerics.underflow_fraction(small.half().double(), small.double()) == 0.4
    small = small[:4]
    assert numerics.underflow_fraction(small.half().double(), small.double()) == 0.5
    with pytest.raises(ValueError, match="shapes differ"):
        numerics.underflow_fraction(values[:2], reference)
    with pytest.raises(ValueError, match="no non-zero"):
        numerics.underflow_fraction(values, torch.zeros(5))


def test_autocast_keeps_float32_grads_and_16_bit_logits(tiny, one_batch):
    for precision, logits in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                              ("fp16", torch.float16), ("fp16+scaler", torch.float16)):
        got = numerics.precision_gradient(tiny, [one_batch], precision)
        assert got.grad_dtype == torch.float32, precision
        assert got.logits_dtype == logits, precision
    bf16_grad = numerics.precision_gradient(tiny, [one_batch], "bf16", grad_dtype=torch.bfloat16)
    assert bf16_grad.grad_dtype == torch.bfloat16
    assert next(tiny.parameters()).grad is None  # the caller's model is untouched


def test_fp16_without_scaling_loses_gradients_that_the_scaler_keeps(tiny, one_batch):
    """N = 4096 x a micro-batch's tokens: 1/(vocab x N) is far below fp16's smallest
    subnormal, so unscaled fp16 flushes almost every per-token gradient entry to zero."""
    records = numerics.underflow_scan(tiny, one_batch, (1, 4096))
    by = {(r["k"], r["precision"]): r for r in records}
    small, large = by[(1, "fp16")], by[(4096, "fp16")]
    scaled = by[(4096, "fp16+scaler")]
    assert large["rel_error"] > 0.05
    assert large["rel_error"] > 20 * scaled["rel_error"]
    assert large["rel_error"] > 10 * small["rel_error"]  # it is the large N that hurts
    assert large["logit_underflow"] > 0.9 and large["param_underflow"] > 0.01
    assert scaled["logit_underflow"] == 0 and scaled["rel_error"] < 2e-3
    assert scaled["loss_scale"] == numerics.DEFAULT_INIT_SCALE
    assert by[(4096, "fp32")]["rel_error"] < 1e-5


def test_bf16_error_is_small_and_independent_of_window_size(tiny, one_batch):
    records = numerics.underflow_scan(tiny, one_batch, (1, 4096), ("fp32", "bf16"))
    bf16 = [r for r in records if r["precision"] == "bf16"]
    fp32 = [r for r in records if r["precision"] == "fp32"]
    assert all(1e-4 < r["rel_error"] < 2e-2 for r in bf16)  # 8 mantissa bits, fp32's range
    assert all(r["logit_underflow"] == 0 for r in bf16)
    assert all(r["rel_error"] < 1e-5 for r in fp32)
    assert bf16[0]["rel_error"] == pytest.approx(bf16[1]["rel_error"], rel=0.05)


def test_window_scan_of_one_micro_batch_is_the_whole_window(tiny):
    examples = random_lm_data(2, seed=4, max_len=16)
    whole = numerics.window_scan(tiny, examples, (1,), micro_batch_size=2,
                                 precisions=("fp32", "bf16"))
    term = numerics.underflow_scan(tiny, pad_collate(examples, 0), (1,), ("fp32", "bf16"))
    for a, b in zip(whole, term):
        assert a["window_items"] == b["window_items"] and a["rel_error"] == b["rel_error"]
    with pytest.raises(ValueError, match="needs 8 examples"):
        numerics.window_scan(tiny, examples, (4,), micro_batch_size=2)


def test_a_scaler_that_overflows_halves_its_scale_and_retries(tiny, one_batch):
    got = numerics.precision_gradient(tiny, [one_batch], "fp16+scaler", init_scale=2.0**22)
    assert got.overflow_retries > 0
    assert got.loss_scale == 2.0**22 / 2**got.overflow_retries
    assert torch.isfinite(got.vector).all()


def test_bad_arguments_say_what_to_change(tiny, one_batch):
    with pytest.raises(ValueError, match="precision must be one of"):
        numerics.precision_gradient(tiny, [one_batch], "fp8")
    with pytest.raises(ValueError, match="must be at least"):
        numerics.precision_gradient(tiny, [one_batch], "fp32", window_items=3)
    with pytest.raises(ValueError, match="GradScaler unscales float32"):
        numerics.precision_gradient(tiny, [one_batch], "fp16+scaler", grad_dtype=torch.float16)


def test_a_16_bit_grad_accumulates_worse_as_k_grows(tiny):
    examples = random_lm_data(8, seed=5, min_len=6, max_len=16)
    records = numerics.accumulation_errors(tiny, examples, (1, 8), precision="fp32")
    err = {(r["k"], r["grad_dtype"]): r["rel_error"] for r in records}
    assert err[(1, "fp32")] < 1e-5 and err[(8, "fp32")] < 1e-5
    assert err[(1, "bf16")] < 4e-3  # one rounding of the finished gradient to bf16
    assert err[(8, "bf16")] > 1.5 * err[(1, "bf16")]  # every addition rounds to 8 bits


def test_scaler_cadence_once_per_window_and_skips_on_overflow(tiny):
    batches = [pad_collate(random_lm_data(2, seed=10 + i, max_len=16), 0) for i in range(10)]
    out = numerics.scaler_cadence(tiny, batches, 2, init_scale=2.0**20, warmup_steps=4)
    windows = out["windows"]
    assert len(windows) == 5
    assert all(w["unscale_"] == 1 and w["update"] == 1 and w["backward"] == 2 for w in windows)
    skipped = [w for w in windows if not w["stepped"]]
    stepped = [w for w in windows if w["stepped"]]
    assert skipped and stepped and windows[0] in skipped  # 2**20 overflows at first
    for w in skipped:
        assert w["optimizer.step"] == 0 and w["scheduler.step"] == 0
        assert w["scale_after"] == w["scale_before"] / 2
        assert not math.isfinite(w["grad_norm"])
    for w in stepped:
        assert w["optimizer.step"] == 1 and w["scheduler.step"] == 1
        # unscale_ came before clipping: the clipped norm is the scaled one / the scale
        assert w["scaled_grad_norm"] / w["grad_norm"] == pytest.approx(w["scale_before"],
                                                                      rel=1e-3)
    # the learning rate follows optimizer steps: it does not advance on skipped windows
    first = windows.index(stepped[0])
    assert all(w["lr"] == windows[0]["lr"] for w in windows[:first + 1])
    assert windows[first + 1]["lr"] > windows[first]["lr"]
    assert out["calls"]["optimizer.step"] == out["calls"]["scheduler.step"] == len(stepped)
