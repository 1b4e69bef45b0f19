"""Issue 15, items 3-5: config fields, every example and the eval data checked before training."""

import numpy as np
import pytest
import torch
from helpers import random_cls_data, random_lm_data

import accumlab
from accumlab import TrainConfig
from accumlab.engine.models import make_model
from accumlab.engine.validate import ConfigWarning, check_examples, model_limits

BASE = dict(micro_batch_size=2, accum_steps=2, max_steps=2, progress=False)


@pytest.mark.parametrize("kwargs, field", [
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
    (dict(min_lr_ratio=-0.1), "min_lr_ratio"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(momentum=1.0), "momentum"),
    (dict(momentum=-0.5), "momentum"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(betas=(-0.1, 0.999)), "betas"),
    (dict(betas=(0.9,)), "betas"),
    (dict(shuffle="no"), "shuffle"),
    (dict(shuffle=0), "shuffle"),
    (dict(lr="3e-4"), "lr.*without quotes"),
    (dict(weight_decay="0.1"), "weight_decay"),
    (dict(clip_grad_norm="1.0"), "clip_grad_norm"),
    (dict(warmup_steps="10"), "warmup_steps"),
    (dict(seed="1"), "seed"),
    (dict(max_steps=None, epochs="2"), "epochs"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr=float("inf")), "lr"),
    (dict(pad_token_id=-1), "pad_token_id"),
    (dict(collective_timeout_s=0), "collective_timeout_s"),
    (dict(keep_last=0), "keep_last"),
])
def test_config_fields_are_checked_and_named(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{**BASE, **kwargs})


def test_warmup_as_long_as_the_run_warns():
    cfg = TrainConfig(**{**BASE, "warmup_steps": 2})
    with pytest.warns(ConfigWarning, match="warmup_steps=2 is not below the run's 2"):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(8, seed=70), cfg)


def test_accum_steps_beyond_an_epoch_warns_and_the_banner_shows_the_batch_used(capsys):
    cfg = TrainConfig(micro_batch_size=2, accum_steps=8, epochs=1, progress=True)
    with pytest.warns(ConfigWarning, match="accum_steps=8 is larger than the 3 micro-batches"):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(6, seed=71), cfg)
    banner = capsys.readouterr().out
    assert "2 micro x 3 steps (not accum_steps=8) x 1 rank(s) = 6 sequences" in banner


class _NotACallback:
    pass


@pytest.mark.parametrize("callbacks, message", [
    ([42], r"callbacks\[0\] is a int"),
    ([print, _NotACallback()], r"callbacks\[1\] is a _NotACallback"),
    ([_NotACallback], r"pass an instance, _NotACallback\(\)"),
    (print, "must be a list"),
])
def test_callbacks_that_are_not_callbacks_are_rejected(callbacks, message):
    with pytest.raises(TypeError, match=message):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(8, seed=72),
                       TrainConfig(**BASE), callbacks=callbacks)


def _broken(change):
    data = random_lm_data(12, seed=73)
    change(data)
    return data


def _set(i, key, value):
    return lambda data: data[i].__setitem__(key, value)


@pytest.mark.parametrize("change, message", [
    (lambda d: d[3]["input_ids"].__setitem__(2, 5000),
     r"train_data example 3: input_ids\[2\] = 5000 is outside the vocabulary \[0, 4096\)"),
    (lambda d: d[5]["input_ids"].__setitem__(0, -1),
     r"train_data example 5: input_ids\[0\] = -1 is outside the vocabulary"),
    (_set(6, "input_ids", list(range(2, 302))),
     "train_data example 6: input_ids has 300 tokens, more than the model's 256 positions"),
    (lambda d: d[4]["labels"].pop(),
     "train_data example 4: labels has .* entries but input_ids has"),
    (lambda d: d[2]["input_ids"].__setitem__(1, 3.5),
     r"train_data example 2: input_ids\[1\] = 3.5 is not an integer"),
    (lambda d: d[7].pop("labels"), "train_data example 7 has no 'labels'"),
    (lambda d: d[8]["labels"].__setitem__(0, 9999),
     r"train_data example 8: labels\[0\] = 9999 is outside the vocabulary \[0, 4096\) \(or -100"),
    (_set(9, "input_ids", "some text"), "train_data example 9: input_ids must be a list"),
    (_set(10, "input_ids", []), "train_data example 10: input_ids is empty"),
    (_set(11, "input_ids", [[5, 6, 7]]), "train_data example 11: input_ids must be a flat list"),
])
def test_bad_examples_are_named_before_any_training(change, message):
    model = make_model("gpt2", "tiny")
    before = [p.detach().clone() for p in model.parameters()]
    steps = []
    with pytest.raises(ValueError, match=message):
        accumlab.train(model, _broken(change), TrainConfig(**BASE), callbacks=[steps.append])
    assert steps == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_pad_token_outside_the_vocabulary_is_an_error():
    cfg = TrainConfig(**{**BASE, "pad_token_id": 5000})
    with pytest.raises(ValueError, match=r"pad_token_id=5000 \(from TrainConfig.pad_token_id\) "
                                         r"is outside the vocabulary \[0, 4096\)"):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(8, seed=74), cfg)


def test_classification_label_outside_the_classes_is_an_error():
    data = random_cls_data(8, seed=75, num_labels=3)
    data[6]["labels"] = 3
    with pytest.raises(ValueError, match="train_data example 6: labels = 3 is not a class of the "
                                         "model, which has num_labels=3"):
        accumlab.train(make_model("bert", "tiny", num_labels=3), data, TrainConfig(**BASE))


def test_tensors_and_numpy_arrays_pass_and_give_the_same_fingerprint():
    data = random_lm_data(20, seed=76)
    limits = model_limits(make_model("gpt2", "tiny"))
    as_lists = check_examples(data, limits, "causal_lm")
    as_tensors = [{k: torch.tensor(v) for k, v in d.items()} for d in data]
    as_numpy = [{k: np.array(v) for k, v in d.items()} for d in data]
    assert check_examples(as_tensors, limits, "causal_lm") == as_lists
    assert check_examples(as_numpy, limits, "causal_lm") == as_lists
    data[0]["labels"][1] = -100
    assert check_examples(data, limits, "causal_lm") != as_lists


def test_examples_are_checked_in_chunks_and_named_by_their_index(monkeypatch):
    import accumlab.engine.validate as validate

    data = random_lm_data(20, seed=81)
    limits = model_limits(make_model("gpt2", "tiny"))
    whole = check_examples(data, limits, "causal_lm")
    monkeypatch.setattr(validate, "CHUNK", 6)
    assert check_examples(data, limits, "causal_lm") == whole  # the same data, the same print
    data[13]["labels"][1] = 4096
    with pytest.raises(ValueError, match=r"train_data example 13: labels\[1\] = 4096"):
        check_examples(data, limits, "causal_lm")


def test_validate_data_off_skips_the_example_checks():
    data = random_lm_data(8, seed=77)
    data[3]["labels"].append(5)  # one label too many: the collator cuts it
    cfg = TrainConfig(**{**BASE, "validate_data": False})
    assert accumlab.train(make_model("gpt2", "tiny"), data, cfg).steps == 2


@pytest.mark.parametrize("eval_data, error, message", [
    ([], ValueError, "eval_data is empty"),
    ("dev.jsonl", TypeError, "eval_data is a path"),
    ({"validation": []}, TypeError, "eval_data is a dict with keys"),
    (iter([{"input_ids": [5, 6], "labels": [5, 6]}]), TypeError, "eval_data must be a map-style"),
    ([{"input_ids": [5, 6, 7]}] * 2, ValueError, "each eval_data example must be a dict with"),
    ([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [5, 6]}], ValueError,
     "eval_data example 1 has no 'labels'"),
    ([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}], ValueError,
     "every label of eval_data is -100"),
    ([{"input_ids": [5, 6, 4096], "labels": [5, 6, 7]}], ValueError,
     r"eval_data example 0: input_ids\[2\] = 4096 is outside"),
])
def test_bad_eval_data_is_an_error_before_training(eval_data, error, message):
    steps = []
    with pytest.raises(error, match=message):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(8, seed=78),
                       TrainConfig(**BASE), eval_data=eval_data, callbacks=[steps.append])
    assert steps == []


def test_eval_metric_of_another_task_is_an_error_before_training():
    steps = []
    cfg = TrainConfig(**{**BASE, "eval_metric": "accuracy"})
    with pytest.raises(ValueError, match="eval_metric='accuracy' is not a metric of causal_lm"):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(8, seed=79), cfg,
                       eval_data=random_lm_data(4, seed=80), callbacks=[steps.append])
    assert steps == []
