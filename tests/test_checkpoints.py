"""Issue 15, items 6-7: tamper-evident checkpoints, a safe `latest`, retention and debris."""

import json
import os
import shutil

import pytest
import torch
from helpers import random_cls_data, random_lm_data

import accumlab
from accumlab import TrainConfig
from accumlab.engine import checkpoint as ckpt_mod
from accumlab.engine.checkpoint import CheckpointError, CheckpointWarning, latest_checkpoint
from accumlab.engine.models import make_model


def _cfg(tmp_path, **kw):
    base = dict(micro_batch_size=2, accum_steps=2, max_steps=3, lr=1e-3, progress=False,
                checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=1, seed=3)
    return TrainConfig(**{**base, **kw})


def _train(tmp_path, data=None, **kw):
    data = data if data is not None else random_lm_data(16, seed=90)
    return accumlab.train(make_model("gpt2", "tiny"), data, _cfg(tmp_path, **kw))


def _edit_state(path, change):
    state = json.loads((path / "state.json").read_text())
    change(state)
    (path / "state.json").write_text(json.dumps(state, indent=1))


def test_a_hand_edited_step_in_state_json_is_detected(tmp_path):
    _train(tmp_path, max_steps=2)
    _edit_state(latest_checkpoint(tmp_path / "ckpt"), lambda s: s.update(step=5))
    with pytest.raises(CheckpointError, match="state.json was changed after it was written"):
        _train(tmp_path, max_steps=6, resume_from="latest")


def test_a_removed_checksum_entry_is_detected_even_with_a_forged_state_checksum(tmp_path):
    _train(tmp_path, max_steps=2)
    path = latest_checkpoint(tmp_path / "ckpt")
    _edit_state(path, lambda s: s["sha256"].pop("model.safetensors"))
    with pytest.raises(CheckpointError, match="changed after it was written"):
        _train(tmp_path, max_steps=4, resume_from="latest")

    def forge(state):  # someone also recomputes the state's own checksum
        state["checksum"] = ckpt_mod._state_checksum(state)

    _edit_state(path, forge)
    with pytest.raises(CheckpointError, match="does not list the checksums"):
        _train(tmp_path, max_steps=4, resume_from="latest")


@pytest.mark.parametrize("pointer", ["../elsewhere", "ABSOLUTE", ".tmp-x", "..", "LINK"])
def test_latest_may_only_name_a_folder_inside_checkpoint_dir(tmp_path, pointer):
    _train(tmp_path, max_steps=2)
    outside = tmp_path / "elsewhere"
    shutil.copytree(latest_checkpoint(tmp_path / "ckpt"), outside)  # intact, but not ours
    name = str(outside) if pointer == "ABSOLUTE" else pointer
    if pointer == "LINK":  # a plain name, but a link that leads out of checkpoint_dir
        os.symlink(outside, tmp_path / "ckpt" / "LINK")
    (tmp_path / "ckpt" / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="not a checkpoint folder inside"):
        _train(tmp_path, max_steps=4, resume_from="latest")


def test_a_dangling_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path):
    _train(tmp_path, max_steps=3)
    root = tmp_path / "ckpt"
    shutil.rmtree(root / "step-00000003")  # latest now names nothing
    blob = bytearray((root / "step-00000002" / "model.safetensors").read_bytes())
    blob[-5] ^= 0xFF
    (root / "step-00000002" / "model.safetensors").write_bytes(bytes(blob))  # damaged
    with pytest.warns(CheckpointWarning, match="names step-00000003, which does not exist: "
                                               "using the newest intact checkpoint, step-00000001"):
        result = _train(tmp_path, max_steps=4, resume_from="latest")
    assert [r["step"] for r in result.history] == [1, 2, 3, 4]


def test_resuming_with_another_dataset_is_an_error(tmp_path):
    _train(tmp_path, random_lm_data(16, seed=91), max_steps=2)
    with pytest.raises(CheckpointError, match="made on 16 examples, this run has 12"):
        _train(tmp_path, random_lm_data(12, seed=91), max_steps=4, resume_from="latest")
    with pytest.raises(CheckpointError, match=r"same size \(16 examples\) but other contents"):
        _train(tmp_path, random_lm_data(16, seed=92), max_steps=4, resume_from="latest")


@pytest.mark.parametrize("keep_last, kept", [(2, [4, 5]), (None, [1, 2, 3, 4, 5])])
def test_keep_last_step_checkpoints(tmp_path, keep_last, kept):
    _train(tmp_path, max_steps=5, keep_last=keep_last)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-"))
    assert names == [f"step-{s:08d}" for s in kept]
    assert latest_checkpoint(tmp_path / "ckpt").name == "step-00000005"


def test_the_default_keeps_three(tmp_path):
    _train(tmp_path, max_steps=5)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step-"))
    assert names == ["step-00000003", "step-00000004", "step-00000005"]


def test_debris_of_a_crash_is_removed_at_the_next_start(tmp_path):
    _train(tmp_path, max_steps=2)
    root = tmp_path / "ckpt"
    (root / ".tmp-step-00000003-k2j3").mkdir()
    (root / ".tmp-step-00000003-k2j3" / "model.safetensors").write_bytes(b"half")
    (root / ".old-best-4242").mkdir()
    (root / ".latest.abc123").write_text("step-0000")
    _train(tmp_path, max_steps=3, resume_from="latest")
    assert not [p.name for p in root.iterdir() if p.name.startswith(".")]


def test_best_is_replaced_without_a_moment_in_which_it_is_missing(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    seen = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def check_best():
        if seen or (root / "best").exists():
            seen.append(True)
            assert (root / "best" / "state.json").exists(), "best was missing"

    def replace(*args, **kwargs):
        real_replace(*args, **kwargs)
        check_best()

    def rmtree(*args, **kwargs):
        real_rmtree(*args, **kwargs)
        check_best()

    monkeypatch.setattr(ckpt_mod.os, "replace", replace)
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", rmtree)
    cfg = TrainConfig(micro_batch_size=8, accum_steps=1, max_steps=5, lr=1e-3, eval_every=1,
                      progress=False, checkpoint_dir=str(root))
    data = random_cls_data(32, seed=93)  # evaluated on its own start: the loss keeps falling
    result = accumlab.train(make_model("bert", "tiny", num_labels=3), data, cfg,
                            eval_data=data[:16])
    monkeypatch.undo()
    losses = [e["loss"] for e in result.evals]
    improvements = sum(1 for i, x in enumerate(losses) if x < min(losses[:i], default=1e9))
    assert improvements >= 3 and len(seen) >= 3 * (improvements - 1)  # checked at every change
    assert json.loads((root / "best" / "state.json").read_text())["step"] == result.best_step
    assert len([p for p in root.iterdir() if p.name.startswith("best-")]) == 1  # old ones gone


def test_state_json_does_not_grow_with_the_history(tmp_path):
    _train(tmp_path, max_steps=8)
    root = tmp_path / "ckpt"
    sizes = [(root / f"step-{s:08d}" / "state.json").stat().st_size for s in (6, 8)]
    assert abs(sizes[1] - sizes[0]) < 64, sizes
    state = json.loads((root / "step-00000008" / "state.json").read_text())
    assert state["history"]["entries"] == 8
    assert len((root / "history.jsonl").read_text().splitlines()) == 8


def test_resume_restores_the_history_exactly_and_cuts_the_log(tmp_path):
    data = random_lm_data(24, seed=95)
    seen = []

    def crash_after_5(entry):
        seen.append(entry)
        if entry["step"] == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        accumlab.train(make_model("gpt2", "tiny"), data, _cfg(tmp_path, max_steps=8,
                                                              checkpoint_every=3),
                       callbacks=[crash_after_5])
    result = accumlab.train(make_model("gpt2", "tiny"), data,
                            _cfg(tmp_path, max_steps=8, checkpoint_every=3, resume_from="latest"))
    assert result.history[:3] == seen[:3]  # every field, times included, read back exactly
    assert [r["step"] for r in result.history] == list(range(1, 9))
    log = [json.loads(line) for line in
           (tmp_path / "ckpt" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 9))  # steps 4-5 of the crash were cut
    assert log == json.loads(json.dumps(result.history))


def test_an_edited_history_log_is_not_trusted(tmp_path):
    _train(tmp_path, max_steps=2)
    log = tmp_path / "ckpt" / "history.jsonl"
    log.write_text(log.read_text().replace('"step": 1', '"step": 7'))
    with pytest.warns(CheckpointWarning, match="history.jsonl does not hold the 2 history"):
        result = _train(tmp_path, max_steps=3, resume_from="latest")
    assert [r["step"] for r in result.history] == [3]
    assert torch.isfinite(torch.tensor(result.losses)).all()
