"""Large batches and long sequences in the trainer: chunked loss, LR scaling, batch ramp,
sequence-length warmup, activation checkpointing and the live noise scale."""

import math

import pytest
import torch
from helpers import random_lm_data

import accumlab
from accumlab import TrainConfig
from accumlab.engine.checkpoint import latest_checkpoint
from accumlab.engine.losses import summed_loss
from accumlab.engine.models import make_model
from accumlab.engine.schedules import ramp_accum_steps, scaled_lr, warmup_seq_len


def _cfg(**kw):
    base = dict(micro_batch_size=4, accum_steps=2, max_steps=6, lr=3e-3, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


# ------------------------------------------------------------------ chunked cross-entropy


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("task", ["causal_lm", "masked_lm"])
def test_chunked_loss_gives_bitwise_the_same_gradient(dtype, task):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 40, 97, generator=g).to(dtype)
    labels = torch.randint(0, 97, (3, 40), generator=g)
    labels[0, :11] = -100
    grads, values = [], []
    for chunk in (None, 1, 7, 50, 10_000):
        logits = base.clone().requires_grad_()
        loss = summed_loss(logits, labels, task, chunk_size=chunk)
        (loss / 70).backward()
        grads.append(logits.grad)
        values.append(float(loss.detach()))
    for grad in grads[1:]:
        assert torch.equal(grad, grads[0])
    assert max(abs(v - values[0]) for v in values) <= 1e-5 * abs(values[0])


def _saved_float32_bytes(fn) -> int:
    """Bytes of float32 tensors that autograd keeps for the backward of fn()."""
    seen = {}

    def pack(t):
        if t.dtype == torch.float32:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_chunked_loss_keeps_no_float32_copy_of_bf16_logits():
    logits = torch.randn(4, 64, 512, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 512, (4, 64))
    full_copy = 4 * 63 * 512 * 4  # the float32 upcast of the shifted logits
    plain, _ = _saved_float32_bytes(lambda: summed_loss(logits, labels, "causal_lm"))
    chunked, loss = _saved_float32_bytes(
        lambda: summed_loss(logits, labels, "causal_lm", chunk_size=64))
    assert plain >= full_copy
    assert chunked < full_copy / 10
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_bad_chunk_size_is_a_clear_error():
    with pytest.raises(ValueError, match="loss_chunk_size"):
        TrainConfig(max_steps=1, loss_chunk_size=0)


# ------------------------------------------------------------------ schedules


def test_scaled_lr_rules():
    assert scaled_lr(1e-3, 64, 16, "linear") == pytest.approx(4e-3)
    assert scaled_lr(1e-3, 64, 16, "sqrt") == pytest.approx(2e-3)
    assert scaled_lr(1e-3, 64, 16, "none") == 1e-3
    with pytest.raises(ValueError, match="'none', 'linear' or 'sqrt'"):
        scaled_lr(1e-3, 64, 16, "cubic")


def test_ramp_grows_the_window_linearly_in_tokens():
    ks = [ramp_accum_steps(t, 8, 1000) for t in (0, 124, 125, 500, 999, 1000, 5000)]
    assert ks == [1, 1, 1, 4, 7, 8, 8]
    assert ramp_accum_steps(0, 8, 0) == 8  # off


def test_sequence_length_warmup():
    lengths = [warmup_seq_len(s, 512, 64, 8) for s in range(10)]
    assert lengths[0] == 64 and lengths[-2:] == [512, 512]
    assert lengths == sorted(lengths) and all(n % 8 == 0 for n in lengths)


def test_config_checks_for_the_new_fields():
    with pytest.raises(ValueError, match="base_batch"):
        TrainConfig(max_steps=1, lr_scaling="linear")
    with pytest.raises(ValueError, match="lr_scaling"):
        TrainConfig(max_steps=1, lr_scaling="cubic", base_batch=8)
    with pytest.raises(ValueError, match="needs max_steps"):
        TrainConfig(epochs=1, batch_ramp_tokens=100)
    with pytest.raises(ValueError, match="seq_len_warmup_steps"):
        TrainConfig(max_steps=1, seq_len_warmup_steps=-1)


# ------------------------------------------------------------------ the trainer


def test_lr_scaling_sets_the_optimizer_lr():
    data = random_lm_data(24, seed=1)
    result = accumlab.train(make_model("gpt2", "tiny"), data,
                            _cfg(max_steps=1, lr=1e-3, lr_scaling="linear", base_batch=2))
    assert result.history[0]["lr"] == pytest.approx(1e-3 * 8 / 2)


def test_batch_ramp_window_sizes_follow_the_tokens_seen():
    data = random_lm_data(64, seed=2)
    result = accumlab.train(make_model("gpt2", "tiny"), data,
                            _cfg(accum_steps=4, max_steps=8, batch_ramp_tokens=600))
    sizes = [r["micro_batches"] for r in result.history]
    seen = 0
    for record in result.history:
        assert record["micro_batches"] == ramp_accum_steps(seen, 4, 600)
        seen += record["tokens"]
    assert sizes[0] == 1 and sizes[-1] == 4 and sizes == sorted(sizes)


def test_ramped_run_resumes_bitwise(tmp_path):
    data = random_lm_data(40, seed=4)
    kw = dict(accum_steps=3, max_steps=9, batch_ramp_tokens=500, noise_scale=True,
              checkpoint_dir=str(tmp_path / "ckpt"))
    full = make_model("gpt2", "tiny", seed=1)
    reference = accumlab.train(full, data, _cfg(**{**kw, "checkpoint_dir": None}))

    def crash(record):
        if record["step"] == 6:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        accumlab.train(make_model("gpt2", "tiny", seed=1), data, _cfg(checkpoint_every=4, **kw),
                       callbacks=[crash])
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000004"
    resumed = make_model("gpt2", "tiny", seed=7)
    result = accumlab.train(resumed, data, _cfg(resume_from="latest", **kw))
    assert [r["micro_batches"] for r in result.history] == \
        [r["micro_batches"] for r in reference.history]
    assert result.history[-1]["noise_scale"] == reference.history[-1]["noise_scale"] or (
        math.isnan(result.history[-1]["noise_scale"])
        and math.isnan(reference.history[-1]["noise_scale"]))
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_sequence_length_warmup_truncates_and_counts_only_kept_tokens():
    data = random_lm_data(48, seed=5, min_len=30, max_len=33)
    result = accumlab.train(make_model("gpt2", "tiny"), data,
                            _cfg(max_steps=5, seq_len_warmup_steps=4, seq_len_start=8))
    lengths = [r["seq_len"] for r in result.history]
    assert lengths[0] == 8 and lengths[-1] == 32 and lengths == sorted(lengths)
    # a window of 2 micro-batches x 4 sequences of 8 tokens holds 2*4*7 label tokens
    assert result.history[0]["items"] == 2 * 4 * 7


def test_activation_checkpointing_and_chunked_loss_do_not_change_training():
    data = random_lm_data(32, seed=6)
    plain = accumlab.train(make_model("gpt2", "tiny", dtype=torch.float64), data,
                           _cfg(precision="fp64", loss_chunk_size=None))
    lean = accumlab.train(make_model("gpt2", "tiny", dtype=torch.float64), data,
                          _cfg(precision="fp64", gradient_checkpointing=True, loss_chunk_size=16))
    assert lean.losses == pytest.approx(plain.losses, rel=1e-12)
    for a, b in zip(plain.model.parameters(), lean.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_noise_scale_is_recorded_every_step():
    data = random_lm_data(64, seed=7)
    result = accumlab.train(make_model("gpt2", "tiny"), data,
                            _cfg(accum_steps=4, max_steps=4, noise_scale=True))
    for record in result.history:
        assert {"noise_scale", "noise_grad_sq", "noise_trace"} <= set(record)
    assert all(math.isfinite(r["noise_trace"]) for r in result.history)
    plain = accumlab.train(make_model("gpt2", "tiny"), data, _cfg(accum_steps=4, max_steps=4))
    assert "noise_scale" not in plain.history[0]
    assert plain.losses == result.losses  # measuring changes nothing


def test_model_without_checkpointing_support_is_a_clear_error():
    class Tiny(torch.nn.Module):
        accumlab_task = "causal_lm"

        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(4096, 8)

        def forward(self, input_ids, attention_mask=None):
            class Out:
                pass

            out = Out()
            out.logits = self.emb(input_ids)
            return out

    with pytest.raises(ValueError, match="gradient_checkpointing"):
        accumlab.train(Tiny(), random_lm_data(8), _cfg(gradient_checkpointing=True))


# ------------------------------------------------------------------ token budgets and packing


def _one_step_params(data, **kw):
    model = make_model("gpt2", "tiny", dtype=torch.float64, seed=2)
    cfg = _cfg(max_steps=1, precision="fp64", optimizer="sgd", lr=0.5, shuffle=False, **kw)
    accumlab.train(model, data, cfg)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_token_budget_micro_batches_give_the_single_batch_update():
    data = random_lm_data(12, seed=8, min_len=3, max_len=40)
    whole = _one_step_params(data, micro_batch_size=12, accum_steps=1)
    budget = _one_step_params(data, micro_batch_size=12, accum_steps=12, micro_batch_tokens=60)
    assert float((whole - budget).norm() / whole.norm()) < 1e-12


def test_token_budget_micro_batches_stay_within_the_budget_and_cover_the_epoch():
    from accumlab.engine.collate import pad_collate

    data = random_lm_data(40, seed=9, min_len=3, max_len=40)
    shapes = []

    def spy(examples):
        batch = pad_collate(examples, 1)
        shapes.append(tuple(batch["input_ids"].shape))
        return batch

    accumlab.train(make_model("gpt2", "tiny"), data,
                   _cfg(micro_batch_size=8, accum_steps=2, epochs=1, max_steps=None,
                        micro_batch_tokens=64), collate=spy)
    assert all(rows * width <= 64 and rows <= 8 for rows, width in shapes)
    assert sum(rows for rows, _ in shapes) == 40  # every example once


def test_packed_rows_train_like_the_documents_in_one_padded_batch():
    from accumlab.data.packing import pack_documents

    docs = random_lm_data(10, seed=10, min_len=3, max_len=20)
    rows = pack_documents(docs, block_size=48)
    assert len(rows) < len(docs)
    unpacked = _one_step_params(docs, micro_batch_size=10, accum_steps=1)
    packed = _one_step_params(rows, micro_batch_size=2, accum_steps=-(-len(rows) // 2))
    assert float((packed - unpacked).norm() / unpacked.norm()) < 1e-12


def test_packed_eval_data_is_evaluated_per_document():
    from accumlab.data.packing import pack_documents
    from accumlab.engine.evaluation import evaluate

    docs = random_lm_data(10, seed=11, min_len=3, max_len=20)
    model = make_model("gpt2", "tiny", dtype=torch.float64, seed=2)
    cfg = _cfg(max_steps=1, precision="fp64", lr=1e-9, eval_every=1)
    result = accumlab.train(model, docs, cfg, eval_data=pack_documents(docs, block_size=48))
    unpacked = evaluate(model, docs, task="causal_lm", pad_token_id=1)
    assert result.eval_metrics["loss"] == pytest.approx(unpacked["loss"], rel=1e-12)


def test_trainer_out_of_memory_suggests_a_split_and_feeds_the_search():
    from accumlab.engine.trainer import OutOfMemoryError
    from accumlab.lab.planner import find_largest_micro_batch

    data = random_lm_data(64, seed=12)

    def make(limit):
        model = make_model("gpt2", "tiny")
        forward = model.forward

        def fake_oom_forward(*args, input_ids=None, **kw):
            if input_ids.shape[0] > limit:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return forward(*args, input_ids=input_ids, **kw)

        model.forward = fake_oom_forward
        return model

    with pytest.raises(OutOfMemoryError, match="micro_batch_size=4, accum_steps=4"):
        accumlab.train(make(5), data, _cfg(micro_batch_size=8, accum_steps=2, max_steps=1))

    found = find_largest_micro_batch(
        lambda micro: accumlab.train(make(6), data, _cfg(micro_batch_size=micro, max_steps=1)),
        limit=32)
    assert found["largest"] == 6
