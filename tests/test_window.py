"""Contract points 2, 3, 5 and 8: partial windows, cadence, empty windows."""

import copy
import math
import types

import pytest
import torch
from helpers import params_vector, random_lm_data, rel_diff

import accumlab
from accumlab import Accumulator, EmptyWindowWarning, TrainConfig
from accumlab.engine.collate import pad_collate
from accumlab.engine.models import make_model
from accumlab.engine.window import default_forward
from accumlab.lab.equivalence import window_gradient


def _micro_batches(data, size):
    return [pad_collate(data[i:i + size], 1) for i in range(0, len(data), size)]


def _run_windows(model, micro, k, policy, lr=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    acc = Accumulator(model, opt, k, task="causal_lm", partial_window=policy)
    records, grads = [], []
    for window in acc.windows(micro):
        for batch in window:
            window.backward(window.loss(default_forward(model, batch), batch["labels"]))
        grads.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
        records.append(window.step())
    return records, grads


@pytest.mark.parametrize("policy", ["step", "drop"])
def test_partial_last_window_is_normalised_by_its_own_count_or_dropped(policy):
    data = random_lm_data(20, seed=11)  # 10 micro-batches of 2, k = 4: windows 4, 4, 2
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    micro = _micro_batches(data, 2)
    probe = copy.deepcopy(model)
    records, grads = _run_windows(model, micro, 4, policy, lr=0.0)  # lr 0: params fixed
    if policy == "drop":
        assert [r.micro_batches for r in records] == [4, 4]
        return
    assert [r.micro_batches for r in records] == [4, 4, 2]
    tail = data[16:]
    exact = window_gradient(probe, tail, 1, task="causal_lm", pad_token_id=1)
    assert rel_diff(grads[2].double(), exact) < 1e-12
    # dividing by k instead of the window's own count would give half the gradient
    assert rel_diff(grads[2].double(), exact * 2 / 4) > 0.4
    assert records[2].items == sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro[8:])


@pytest.mark.parametrize("policy, steps", [("step", 3), ("drop", 2)])
def test_trainer_partial_window_policy(policy, steps):
    cfg = TrainConfig(micro_batch_size=2, accum_steps=4, epochs=1, partial_window=policy,
                      shuffle=False, progress=False)
    result = accumlab.train(make_model("gpt2", "tiny"), random_lm_data(20, seed=12), cfg)
    assert result.steps == steps
    assert [r["micro_batches"] for r in result.history] == [4, 4, 2][:steps]


class _Counter:
    def __init__(self):
        self.calls = {}

    def wrap(self, obj, name):
        original = getattr(type(obj), name)
        calls = self.calls

        def counted(this, *args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return original(this, *args, **kwargs)

        setattr(obj, name, types.MethodType(counted, obj))  # bound, as LR schedulers expect


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cadence_once_per_window(monkeypatch, precision):
    """optimizer step, scheduler step, clipping, zero_grad and the GradScaler: once a window."""
    counter = _Counter()
    import accumlab.engine.window as window_mod

    real_clip = torch.nn.utils.clip_grad_norm_

    def clip(*args, **kwargs):
        counter.calls["clip"] = counter.calls.get("clip", 0) + 1
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(window_mod.torch.nn.utils, "clip_grad_norm_", clip)
    real_opt_init = torch.optim.AdamW.__init__
    real_sched_init = torch.optim.lr_scheduler.LambdaLR.__init__
    real_scaler_init = torch.amp.GradScaler.__init__

    def opt_init(self, *a, **kw):
        real_opt_init(self, *a, **kw)
        counter.wrap(self, "step")
        counter.wrap(self, "zero_grad")

    def sched_init(self, *a, **kw):
        real_sched_init(self, *a, **kw)
        self._counted_steps = 0
        original = self.step

        def step(*args, **kwargs):
            counter.calls["scheduler"] = counter.calls.get("scheduler", 0) + 1
            return original(*args, **kwargs)

        self.step = step

    def scaler_init(self, *a, **kw):
        real_scaler_init(self, *a, **kw)
        for name in ("unscale_", "update"):
            counter.wrap(self, name)

    monkeypatch.setattr(torch.optim.AdamW, "__init__", opt_init)
    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "__init__", sched_init)
    monkeypatch.setattr(torch.amp.GradScaler, "__init__", scaler_init)
    data = random_lm_data(32, seed=13, max_len=12)
    cfg = TrainConfig(micro_batch_size=2, accum_steps=4, epochs=1, clip_grad_norm=1.0,
                      precision=precision, progress=False, warmup_steps=2, schedule="linear")
    result = accumlab.train(make_model("gpt2", "tiny"), data, cfg)
    windows = 4
    scheduler_steps = counter.calls.get("scheduler", 0)  # counted after LambdaLR's own first step
    assert result.steps == windows
    assert counter.calls["clip"] == windows
    assert counter.calls["zero_grad"] == windows
    assert scheduler_steps == windows
    if precision == "fp16":
        assert counter.calls["unscale_"] == windows
        assert counter.calls["update"] == windows
        # the optimizer's own step is called through scaler.step, once per non-skipped window
        assert counter.calls.get("step", 0) <= windows
    else:
        assert counter.calls["step"] == windows
    # learning rates follow optimizer steps: warmup over 2, then linear decay over the other 2
    lrs = [r["lr"] / cfg.lr for r in result.history]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5])


def test_window_with_every_label_masked_is_skipped_with_a_warning():
    model = make_model("gpt2", "tiny", seed=0)
    data = random_lm_data(8, seed=14)
    masked = [{"input_ids": d["input_ids"], "labels": [-100] * len(d["labels"])}
              for d in data[:4]]
    micro = _micro_batches(masked + data[4:], 2)  # window 1 all masked, window 2 normal
    before = params_vector(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = Accumulator(model, opt, 2, task="causal_lm")
    windows = list(acc.windows(micro))
    with pytest.warns(EmptyWindowWarning, match="every label masked"):
        assert list(windows[0]) == []
        record = windows[0].step()
    assert not record.stepped and record.items == 0
    assert torch.equal(params_vector(model), before)
    for batch in windows[1]:
        windows[1].backward(windows[1].loss(default_forward(model, batch), batch["labels"]))
    record = windows[1].step()
    assert record.stepped and math.isfinite(record.loss)
    assert torch.isfinite(params_vector(model)).all()
    assert not torch.equal(params_vector(model), before)


def test_trainer_skips_empty_window_and_counts_only_real_steps():
    data = random_lm_data(8, seed=15)
    for d in data[:4]:
        d["labels"] = [-100] * len(d["labels"])
    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, epochs=1, shuffle=False,
                      progress=False)
    with pytest.warns(EmptyWindowWarning):
        result = accumlab.train(make_model("gpt2", "tiny"), data, cfg)
    assert result.steps == 1
    assert all(math.isfinite(r["loss"]) for r in result.history)


def test_all_labels_masked_everywhere_is_a_clear_error():
    data = [{"input_ids": d["input_ids"], "labels": [-100] * len(d["labels"])}
            for d in random_lm_data(8, seed=16)]
    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=3, progress=False)
    with pytest.warns(EmptyWindowWarning), pytest.raises(ValueError, match="all labels masked"):
        accumlab.train(make_model("gpt2", "tiny"), data, cfg)


def test_history_record_fields_and_jsonl(tmp_path):
    cfg = TrainConfig(micro_batch_size=4, accum_steps=2, max_steps=3, progress=False,
                      run_dir=str(tmp_path))
    result = accumlab.train(make_model("gpt2", "tiny"), random_lm_data(40, seed=17), cfg)
    assert len(result.history) == 3
    for key in ("step", "loss", "lr", "grad_norm", "items", "tokens_per_s", "peak_memory_mb"):
        assert key in result.history[0]
    lines = (tmp_path / "history.jsonl").read_text().splitlines()
    assert len(lines) == 3
