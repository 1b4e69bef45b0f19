"""CUDA code paths; skipped without a GPU, run on one when available."""

import math

import pytest
import torch
from helpers import random_lm_data

import accumlab
from accumlab.engine.models import make_model
from accumlab.lab.equivalence import compare_gradients

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_runs_and_reports_cuda_memory(precision):
    model = make_model("gpt2", "mini")
    cfg = accumlab.TrainConfig(micro_batch_size=4, accum_steps=4, max_steps=4, lr=1e-3,
                               precision=precision, device="cuda", progress=False,
                               clip_grad_norm=1.0)
    result = accumlab.train(model, random_lm_data(64, seed=50), cfg)
    assert next(model.parameters()).device.type == "cuda"
    assert next(model.parameters()).dtype == torch.float32
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert 0 < result.history[-1]["peak_memory_mb"] < 4096


@cuda
def test_cuda_float64_accumulation_is_exact_and_fp32_close():
    model = make_model("gpt2", "tiny")
    records = compare_gradients(model, random_lm_data(32, seed=51), ks=(1, 4, 8),
                                precisions=("fp64", "fp32"), device="cuda")
    by = {(r["precision"], r["k"]): r for r in records}
    assert by[("fp64", 8)]["vs_single"] < 1e-12
    assert by[("fp32", 8)]["vs_single"] < 1e-4


@cuda
def test_cuda_accumulated_equals_single_batch_after_training():
    data = random_lm_data(64, seed=52)
    finals = []
    for micro, k in ((16, 1), (4, 4)):
        model = make_model("gpt2", "tiny", seed=0)
        cfg = accumlab.TrainConfig(micro_batch_size=micro, accum_steps=k, max_steps=4,
                                   lr=1e-3, precision="fp64", device="cuda", progress=False)
        accumlab.train(model, data, cfg)
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert float((finals[0] - finals[1]).norm() / finals[0].norm()) < 1e-10


@cuda
def test_cuda_non_finite_loss_leaves_the_weights_untouched():
    """On CUDA the fused AdamW step is guarded on device (found_inf): no sync before it."""
    model = make_model("gpt2", "tiny")
    before = [p.detach().clone() for p in model.parameters()]

    def poison(entry):  # break the weights after step 1 so that step 2's loss is NaN
        with torch.no_grad():
            model.transformer.wte.weight.fill_(float("nan"))
            before[:] = [p.detach().clone() for p in model.parameters()]

    cfg = accumlab.TrainConfig(micro_batch_size=4, accum_steps=2, max_steps=3, lr=1e-3,
                               device="cuda", progress=False)
    with pytest.raises(FloatingPointError, match="weights were not updated"):
        accumlab.train(model, random_lm_data(32, seed=53), cfg, callbacks=[poison])
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num())


@cuda
def test_cuda_chunked_loss_lowers_peak_memory_and_keeps_the_gradient():
    from accumlab.engine.losses import summed_loss

    logits = torch.randn(8, 512, 8192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 8192, (8, 512), device="cuda")
    peaks, grads = [], []
    for chunk in (None, 1024):
        logits.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        summed_loss(logits, labels, "causal_lm", chunk_size=chunk).backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append(logits.grad.clone())
    assert torch.equal(grads[0], grads[1])
    assert peaks[1] < 0.6 * peaks[0], peaks
