"""accumlab.train: exact resume, checkpoints, evaluation, early stopping, and clear errors."""

import json
import math

import pytest
import torch
from helpers import params_vector, random_cls_data, random_lm_data

import accumlab
from accumlab import StopTraining, TrainConfig
from accumlab.engine.checkpoint import CheckpointError, latest_checkpoint
from accumlab.engine.models import count_parameters, load_model, make_model
from accumlab.engine.trainer import suggest_split


def _cfg(tmp_path, **kw):
    base = dict(micro_batch_size=4, accum_steps=2, max_steps=12, lr=3e-3, progress=False,
                checkpoint_dir=str(tmp_path / "ckpt"), schedule="cosine", warmup_steps=3,
                clip_grad_norm=1.0, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_from_step_7_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    # dropout on, so the restored RNG state matters too
    data = random_lm_data(40, seed=20)  # 5 windows per epoch: the run crosses epochs
    full = make_model("gpt2", "tiny", seed=1, dropout=0.1)
    accumlab.train(full, data, _cfg(tmp_path / "a", checkpoint_dir=None))

    def crash_after_7(record):
        if record["step"] == 9:
            raise RuntimeError("simulated crash")

    crashed = make_model("gpt2", "tiny", seed=1, dropout=0.1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        accumlab.train(crashed, data, _cfg(tmp_path, checkpoint_every=7),
                       callbacks=[crash_after_7])
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000007"
    resumed = make_model("gpt2", "tiny", seed=99, dropout=0.1)  # other init: weights come back
    result = accumlab.train(resumed, data, _cfg(tmp_path, resume_from="latest"))
    assert result.steps == 12
    assert [r["step"] for r in result.history] == list(range(1, 13))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    data = random_lm_data(16, seed=21)
    accumlab.train(make_model("gpt2", "tiny"), data, _cfg(tmp_path, max_steps=2,
                                                          checkpoint_every=2))
    path = latest_checkpoint(tmp_path / "ckpt")
    blob = bytearray((path / "model.safetensors").read_bytes())
    blob[-10] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="damaged"):
        accumlab.train(make_model("gpt2", "tiny"), data,
                       _cfg(tmp_path, max_steps=4, resume_from="latest"))


def test_checkpoint_from_another_config_is_a_clear_error(tmp_path):
    data = random_lm_data(16, seed=22)
    accumlab.train(make_model("gpt2", "tiny"), data, _cfg(tmp_path, max_steps=2,
                                                          checkpoint_every=2))
    with pytest.raises(CheckpointError, match="accum_steps: checkpoint 2, this run 4"):
        accumlab.train(make_model("gpt2", "tiny"), data,
                       _cfg(tmp_path, max_steps=4, accum_steps=4, resume_from="latest"))
    with pytest.raises(CheckpointError, match="parameters differ|shape"):
        accumlab.train(make_model("gpt2", "mini"), data,
                       _cfg(tmp_path, max_steps=4, resume_from="latest"))


def test_checkpoint_files_are_safe_formats(tmp_path):
    data = random_lm_data(16, seed=23)
    accumlab.train(make_model("gpt2", "tiny"), data, _cfg(tmp_path, max_steps=2,
                                                          checkpoint_every=1))
    path = latest_checkpoint(tmp_path / "ckpt")
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "state.json", "training_state.pt"]
    torch.load(path / "training_state.pt", weights_only=True)
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 2 and state["config"]["accum_steps"] == 2
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".tmp")]


def test_classification_eval_early_stopping_and_best_checkpoint(tmp_path):
    train_data = random_cls_data(48, seed=24)
    eval_data = random_cls_data(16, seed=25)
    cfg = TrainConfig(micro_batch_size=8, accum_steps=2, max_steps=40, lr=1e-2,
                      eval_every=1, eval_metric="loss", early_stopping_patience=2,
                      progress=False, checkpoint_dir=str(tmp_path))
    seen = []

    class Watch:
        def on_evaluate(self, metrics):
            seen.append(metrics)

    model = make_model("bert", "tiny", num_labels=3)
    result = accumlab.train(model, train_data, cfg, eval_data=eval_data, callbacks=[Watch()])
    # random labels: the eval loss soon stops improving, and training stops early
    assert result.stopped_early and result.steps < 40
    assert {"loss", "accuracy", "f1"} <= set(result.eval_metrics)
    assert len(seen) == result.steps
    best = min(e["loss"] for e in result.evals)
    assert result.best_metrics["loss"] == best
    assert (tmp_path / "best" / "model.safetensors").exists()
    state = json.loads((tmp_path / "best" / "state.json").read_text())
    assert state["step"] == result.best_step


def test_language_model_eval_reports_perplexity():
    cfg = TrainConfig(micro_batch_size=4, accum_steps=2, max_steps=2, progress=False)
    result = accumlab.train(make_model("gpt2", "tiny"), random_lm_data(16, seed=26), cfg,
                            eval_data=random_lm_data(8, seed=27))
    m = result.eval_metrics
    assert math.isclose(m["perplexity"], math.exp(m["loss"]))
    assert 6.0 < m["loss"] < 10.0  # near log(4096) = 8.3 for an untrained model


def test_stop_training_from_a_callback():
    def stop(record):
        if record["step"] == 2:
            raise StopTraining

    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=10, progress=False)
    result = accumlab.train(make_model("gpt2", "tiny"), random_lm_data(16, seed=28), cfg,
                            callbacks=[stop])
    assert result.steps == 2 and result.stopped_early


@pytest.mark.parametrize("kwargs, field", [
    (dict(accum_steps=0), "accum_steps"),
    (dict(accum_steps=-2), "accum_steps"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(precision="fp8"), "precision"),
    (dict(optimizer="adam"), "optimizer"),
    (dict(schedule="step"), "schedule"),
    (dict(loss_normalization="mean"), "loss_normalization"),
    (dict(partial_window="keep"), "partial_window"),
    (dict(lr=0), "lr"),
    (dict(max_steps=None), "max_steps"),
    (dict(epochs=1), "only one"),
    (dict(checkpoint_every=5), "checkpoint_dir"),
])
def test_bad_config_names_the_field(kwargs, field):
    base = dict(micro_batch_size=2, accum_steps=2, max_steps=3)
    base.update(kwargs)
    with pytest.raises(ValueError, match=field):
        TrainConfig(**base)


def test_bad_data_is_a_clear_error():
    model = make_model("gpt2", "tiny")
    cfg = TrainConfig(micro_batch_size=8, accum_steps=2, max_steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        accumlab.train(model, [], cfg)
    with pytest.raises(ValueError, match="fewer than one micro-batch.*micro_batch_size"):
        accumlab.train(model, random_lm_data(5), cfg)
    with pytest.raises(ValueError, match="input_ids"):
        accumlab.train(model, [{"text": "hi"}] * 8, cfg)


def test_nan_loss_is_a_clear_error_and_leaves_weights_alone():
    model = make_model("gpt2", "tiny")
    with torch.no_grad():
        model.transformer.wte.weight[5:] = float("nan")
    cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=2, progress=False)
    with pytest.raises(FloatingPointError, match="step 1: the window loss is nan.*learning rate"):
        accumlab.train(model, random_lm_data(8, seed=29), cfg)


def test_out_of_memory_message_keeps_the_effective_batch():
    msg = suggest_split(16, 4, step=2)
    assert "micro_batch_size=8, accum_steps=8" in msg
    assert "activation checkpointing" in suggest_split(1, 64)


def test_models_factory_sizes_and_local_from_pretrained(tmp_path):
    tiny = make_model("gpt2", "tiny")
    assert count_parameters(tiny) < 1_000_000
    assert count_parameters(make_model("bert", "tiny", num_labels=4)) < 1_000_000
    tiny.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), task="causal_lm")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(tiny(input_ids=ids).logits, loaded(input_ids=ids).logits)
    assert torch.equal(params_vector(tiny), params_vector(loaded))
    from accumlab.engine.models import gpt2_config

    big = gpt2_config("gpt2-small", max_positions=1024)
    assert (big.n_layer, big.n_embd, big.vocab_size) == (12, 768, 50257)


def test_bf16_and_fp16_train_and_keep_float32_parameters():
    for precision in ("bf16", "fp16"):
        model = make_model("gpt2", "tiny")
        cfg = TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=2, progress=False,
                          precision=precision)
        result = accumlab.train(model, random_lm_data(8, seed=30, max_len=10), cfg)
        assert next(model.parameters()).dtype == torch.float32
        assert all(math.isfinite(r["loss"]) for r in result.history)


def test_eval_every_epoch_and_best_weights_reload(tmp_path):
    from accumlab.engine.checkpoint import load_weights
    from accumlab.engine.evaluation import evaluate

    train_data, dev = random_cls_data(32, seed=31), random_cls_data(12, seed=32)
    cfg = TrainConfig(micro_batch_size=4, accum_steps=2, epochs=3, lr=1e-2, eval_every="epoch",
                      eval_metric="accuracy", progress=False, checkpoint_dir=str(tmp_path))
    result = accumlab.train(make_model("bert", "tiny", num_labels=3), train_data, cfg,
                            eval_data=dev)
    assert [e["step"] for e in result.evals] == [4, 8, 12]  # 4 windows per epoch
    fresh = make_model("bert", "tiny", num_labels=3, seed=7)
    state = load_weights(tmp_path / "best", fresh)
    assert state["step"] == result.best_step
    again = evaluate(fresh, dev, task="classification", batch_size=4, pad_token_id=1)
    assert again["accuracy"] == result.best_metrics["accuracy"]
    assert again["loss"] == pytest.approx(result.best_metrics["loss"], rel=1e-6)
