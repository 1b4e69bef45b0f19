"""Issue 15, item 1: a non-finite gradient or loss never reaches the weights or a checkpoint."""

import math

import pytest
import torch
from helpers import params_vector, random_lm_data

import accumlab
from accumlab import Accumulator, TrainConfig
from accumlab.engine.checkpoint import latest_checkpoint
from accumlab.engine.collate import pad_collate
from accumlab.engine.models import make_model
from accumlab.engine.window import NonFiniteWarning, default_forward


def _inf_gradient_on(model, backward_calls):
    """Make the embedding's gradient inf on the given backward calls (1-based); loss stays finite."""
    calls = [0]

    def hook(grad):
        calls[0] += 1
        return torch.full_like(grad, float("inf")) if calls[0] in backward_calls else grad

    model.transformer.wte.weight.register_hook(hook)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_non_finite_gradient_stops_before_the_step_and_before_any_checkpoint(tmp_path, clip):
    model = make_model("gpt2", "tiny")
    _inf_gradient_on(model, {5})  # accum_steps 2: backward 5 is in window 3
    after_step = []
    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=5, lr=1e-3, progress=False,
                      clip_grad_norm=clip, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"step 3: the gradient norm is (inf|nan)"):
        accumlab.train(model, random_lm_data(24, seed=60), cfg,
                       callbacks=[lambda entry: after_step.append(params_vector(model))])
    assert len(after_step) == 2
    assert torch.equal(params_vector(model), after_step[-1])  # step 3 changed nothing
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert all(p.grad is None for p in model.parameters())


def _windows(model, optimizer, data, k=2):
    micro = [pad_collate(data[i:i + 2], 1) for i in range(0, len(data), 2)]
    return Accumulator(model, optimizer, k, task="causal_lm").windows(micro)


def _backward(model, window):
    for batch in window:
        window.backward(window.loss(default_forward(model, batch), batch["labels"]))


@pytest.mark.parametrize("fused", [False, True])  # fused AdamW: the update is skipped on device
def test_hand_written_loop_that_catches_the_error_is_not_corrupted(fused):
    model = make_model("gpt2", "tiny", seed=0)
    _inf_gradient_on(model, {1})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
    before = params_vector(model)
    windows = _windows(model, opt, random_lm_data(8, seed=61))
    first = next(windows)
    _backward(model, first)
    with pytest.raises(FloatingPointError, match="gradient norm is inf.*not updated"):
        first.step()
    assert torch.equal(params_vector(model), before)
    assert all(p.grad is None for p in model.parameters())  # the inf is not carried over
    second = next(windows)
    _backward(model, second)
    record = second.step()
    assert record.stepped and math.isfinite(record.grad_norm)
    assert torch.isfinite(params_vector(model)).all()
    assert not torch.equal(params_vector(model), before)


def test_infinite_learning_rate_is_rejected():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(micro_batch_size=2, max_steps=2, lr=float("inf"))


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = make_model("gpt2", "tiny")

    def break_unused_position(entry):  # positions >= 40 never occur, so the loss stays finite
        if entry["step"] == 1:
            with torch.no_grad():
                model.transformer.wpe.weight[200] = float("nan")

    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=3, progress=False,
                      checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(FloatingPointError, match="step 2.*transformer.wpe.weight"):
        accumlab.train(model, random_lm_data(16, seed=62), cfg,
                       callbacks=[break_unused_position])
    assert latest_checkpoint(tmp_path).name == "step-00000001"
    assert not (tmp_path / "step-00000002").exists()


def test_fp16_non_finite_loss_is_skipped_by_the_grad_scaler_and_training_goes_on():
    model = make_model("gpt2", "tiny")
    calls = [0]

    def nan_logits(module, inputs, output):  # forward 3 = window 2's first micro-batch
        calls[0] += 1
        return output * float("nan") if calls[0] == 3 else output

    model.lm_head.register_forward_hook(nan_logits)
    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=3, precision="fp16",
                      progress=False, shuffle=False)
    with pytest.warns(NonFiniteWarning, match="GradScaler skipped"):
        result = accumlab.train(model, random_lm_data(16, seed=63, max_len=10), cfg)
    assert result.steps == 3
    skipped = [r for r in result.history if r["skipped"]]
    assert skipped and math.isnan(skipped[0]["loss"])
    assert "not finite" in skipped[0]["skipped_reason"]
    assert torch.isfinite(params_vector(model)).all()


def test_fp16_gives_up_when_every_window_stays_non_finite(monkeypatch):
    import accumlab.engine.window as window_mod

    monkeypatch.setattr(window_mod, "MAX_SKIPS_IN_A_ROW", 4)  # 30 by default; fp16 CPU is slow
    model = make_model("gpt2", "tiny")
    model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan"))
    cfg = TrainConfig(micro_batch_size=2, accum_steps=1, max_steps=2, precision="fp16",
                      progress=False)
    with pytest.warns(NonFiniteWarning), pytest.raises(FloatingPointError, match="4 windows in a row"):
        accumlab.train(model, random_lm_data(8, seed=64, max_len=6), cfg)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_non_finite_gradient_is_skipped_on_device_and_cleared():
    model = make_model("gpt2", "tiny").cuda()
    _inf_gradient_on(model, {1})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    before = params_vector(model)
    micro = [{k: v.cuda() for k, v in pad_collate(random_lm_data(4, seed=65)[i:i + 2], 1).items()}
             for i in (0, 2)]
    (window,) = list(Accumulator(model, opt, 2, task="causal_lm").windows(micro))
    _backward(model, window)
    with pytest.raises(FloatingPointError, match="gradient norm is inf"):
        window.step()
    assert torch.equal(params_vector(model), before)
    assert all(p.grad is None for p in model.parameters())
    assert all(float(s["step"]) == 0 for s in opt.state.values())  # the skip left no step


@cuda
def test_cuda_window_step_reads_the_device_once():
    """Loss and gradient norm come to the host together, after the fused step is queued."""
    import warnings

    model = make_model("gpt2", "tiny").cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    micro = [{k: v.cuda() for k, v in pad_collate(random_lm_data(8, seed=66)[i:i + 2], 1).items()}
             for i in range(0, 8, 2)]
    windows = list(Accumulator(model, opt, 2, task="causal_lm", clip_grad_norm=1.0)
                   .windows(micro))
    for window in windows:  # the first step creates the optimizer state; count the second
        _backward(model, window)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                record = window.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert record.stepped and len(syncs) == 1, [str(w.message)[:80] for w in syncs]
