"""FSDP2 (parallel="fsdp") on 2 CPU ranks (gloo, float64): the window contract under sharding.

Three torchrun launches of tests/fsdp_worker.py (main, killed, resume) feed every test; the
single-process references run here.
"""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import params_vector, random_cls_data, random_lm_data, rel_diff

import accumlab
from accumlab.engine import fsdp
from accumlab.engine.checkpoint import CheckpointError
from accumlab.engine.models import make_model
from accumlab.engine.sharded_checkpoint import (
    export_pretrained,
    is_sharded_checkpoint,
    load_consolidated,
)

TESTS = Path(__file__).parent
ABORT = "terminate called without an active exception"


def _torchrun(out: Path, mode: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "fsdp_worker.py"), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0 and ABORT in proc.stderr:
        # Seen once in about 20 launches, in a clean CI run only: a rank aborted in C++
        # ("terminate called without an active exception", SIGABRT) and could not be reproduced
        # in 16 further launches. Retry that one failure once, saying so; any other failure,
        # or the same one twice, fails the test.
        warnings.warn(f"torchrun {mode}: a rank aborted in C++ (SIGABRT); launching once more",
                      stacklevel=2)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[:3000] + "\n...\n" + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp")
    _torchrun(out, "main")
    killed = _torchrun(out, "killed", check=False)
    assert killed.returncode != 0  # both ranks exited hard at step 3
    after_kill = sorted(p.name for p in (out / "killed").iterdir())
    latest_after_kill = (out / "killed" / "latest").read_text().strip()
    _torchrun(out, "resume")
    report = {m: json.loads((out / f"{m}.json").read_text()) for m in ("main", "resume")}
    report["params"] = {**torch.load(out / "main.pt"), **torch.load(out / "resume.pt")}
    report.update(out=out, after_kill=after_kill, latest_after_kill=latest_after_kill)
    return report


class OptimizerBytes:
    def on_train_begin(self, info):
        self.optimizer = info["optimizer"]

    def on_train_end(self, result):
        self.bytes = fsdp.optimizer_state_bytes(self.optimizer)


def _single(model, data, **kw):
    """One process, micro 8 and k 1: the run 2 ranks x micro 2 x k 2 must equal."""
    cfg = accumlab.TrainConfig(micro_batch_size=8, accum_steps=1, max_steps=3, lr=1e-2,
                               precision="fp64", shuffle=False, progress=False, **kw)
    meter = OptimizerBytes()
    result = accumlab.train(model, data, cfg, callbacks=[meter])
    return result, meter.bytes


def test_gpt2_two_ranks_fsdp_equal_one_process_micro_8(launched):
    run = launched["main"]["runs"]["gpt2"]
    assert launched["main"]["world"] == 2
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    result, _ = _single(model, random_lm_data(48, seed=40), clip_grad_norm=1.0)
    assert result.history[0]["grad_norm"] > 1.0  # the clipping of the sharded gradient acted
    assert rel_diff(launched["params"]["gpt2"], params_vector(model)) < 1e-10
    assert run["losses"] == pytest.approx(result.losses, rel=1e-12)  # L_W of both ranks


def test_a_sharded_model_saved_with_save_pretrained_is_the_whole_trained_model(launched):
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(launched["out"] / "gpt2_pretrained",
                                            dtype=torch.float64)
    assert torch.equal(params_vector(model), launched["params"]["gpt2"])


def test_bert_two_ranks_fsdp_equal_one_process_micro_8(launched):
    run = launched["main"]["runs"]["bert"]
    model = make_model("bert", "tiny", seed=0, dtype=torch.float64, num_labels=3)
    result, _ = _single(model, random_cls_data(48, seed=41))
    assert rel_diff(launched["params"]["bert"], params_vector(model)) < 1e-10
    assert run["losses"] == pytest.approx(result.losses, rel=1e-12)


def test_one_reduce_scatter_per_group_per_window_with_sync_skipped_k_without(launched):
    runs = launched["main"]["runs"]
    skipped, every = runs["gpt2"], runs["gpt2_sync_every"]
    groups, k = skipped["groups"], 2
    assert groups == 3  # two GPT-2 blocks and the root (embeddings, tied head, final norm)
    assert [s["reduce_scatters"] for s in skipped["steps"]] == [groups] * 3  # 1 per group
    assert [s["reduce_scatters"] for s in every["steps"]] == [k * groups] * 3
    assert every["steps"][0]["reduce_scatter_bytes"] == k * skipped["steps"][0][
        "reduce_scatter_bytes"]
    # the all-gathers of the weights do not depend on the gradient sync
    assert every["steps"][0]["all_gathers"] == skipped["steps"][0]["all_gathers"]
    assert rel_diff(launched["params"]["gpt2_sync_every"], launched["params"]["gpt2"]) < 1e-12
    assert every["losses"] == pytest.approx(skipped["losses"], rel=1e-12)


def test_optimizer_state_and_weights_per_rank_are_half_the_single_process(launched):
    run = launched["main"]["runs"]["gpt2"]
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    _, single_bytes = _single(model, random_lm_data(48, seed=40))
    single_params = fsdp.local_bytes({id(p): p for p in model.parameters()}.values())
    for rank_bytes, rank_params in zip(run["optimizer_bytes"], run["param_bytes"]):
        assert 0.49 < rank_bytes / single_bytes < 0.51, (rank_bytes, single_bytes)
        assert rank_params * 2 == single_params


def test_bf16_computes_in_bf16_and_reduces_gradients_in_fp32(launched):
    runs = launched["main"]["runs"]
    bf16, fp64 = runs["gpt2_bf16"]["steps"][0], runs["gpt2"]["steps"][0]
    assert bf16["all_gather_bytes"] * 4 == fp64["all_gather_bytes"]  # 2-byte weights
    assert bf16["reduce_scatter_bytes"] * 2 == fp64["reduce_scatter_bytes"]  # 4-byte grads
    losses = runs["gpt2_bf16"]["losses"]  # step 1 is before any update (fp64 run clips)
    assert losses[0] == pytest.approx(runs["gpt2"]["losses"][0], rel=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_kill_and_resume_from_a_sharded_checkpoint_is_bitwise_the_uninterrupted_run(launched):
    assert launched["latest_after_kill"] == "step-00000002"
    assert launched["after_kill"] == ["best", "best-00000002", "history.jsonl", "latest",
                                      "step-00000002"]  # nothing half-written
    resumed, whole = launched["resume"]["runs"]["resumed"], launched["main"]["runs"][
        "uninterrupted"]
    assert torch.equal(launched["params"]["resumed"], launched["params"]["uninterrupted"])
    assert resumed["losses"] == whole["losses"]  # steps 1-2 read back, 3-4 trained again
    assert resumed["history_steps"] == [1, 2, 3, 4]
    assert resumed["evals"] == whole["evals"] and len(whole["evals"]) == 2  # steps 2 and 4
    assert len(resumed["steps"]) == 2  # only steps 3 and 4 ran after the resume


def test_consolidated_checkpoint_is_the_whole_model_and_loads_with_from_pretrained(
        launched, tmp_path):
    ckpt = launched["out"] / "uninterrupted" / "step-00000004"
    assert is_sharded_checkpoint(ckpt)
    model = load_consolidated(ckpt)  # class, config and dtype from the checkpoint
    assert torch.equal(params_vector(model), launched["params"]["uninterrupted"])
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    from transformers import GPT2LMHeadModel

    folder = export_pretrained(ckpt, tmp_path / "pretrained")
    again = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float64)
    assert torch.equal(params_vector(again), params_vector(model))


def test_the_best_checkpoint_is_a_sharded_checkpoint_behind_a_link(launched):
    whole = launched["main"]["runs"]["uninterrupted"]
    best = launched["out"] / "uninterrupted" / "best"
    assert best.is_symlink() and is_sharded_checkpoint(best)
    state = json.loads((best / "state.json").read_text())
    assert state["step"] == whole["best_step"] and state["world_size"] == 2
    load_consolidated(best)  # intact and whole


def test_a_damaged_shard_is_refused(launched, tmp_path):
    ckpt = tmp_path / "copy"
    shutil.copytree(launched["out"] / "uninterrupted" / "step-00000004", ckpt)
    shard = ckpt / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="__1_0.distcp is missing or damaged"):
        load_consolidated(ckpt)


def test_a_sharded_checkpoint_resumed_without_fsdp_says_what_to_do(launched, tmp_path):
    ckpt = launched["out"] / "uninterrupted" / "step-00000002"
    cfg = accumlab.TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=4, lr=1e-2,
                               precision="fp64", progress=False, schedule="cosine",
                               warmup_steps=2, clip_grad_norm=1.0, weight_decay=0.1,
                               resume_from=str(ckpt))
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64, dropout=0.1)
    with pytest.raises(CheckpointError, match="parallel='fsdp'.*load_consolidated"):
        accumlab.train(model, random_lm_data(48, seed=40), cfg)


def test_fsdp_outside_torchrun_is_a_clear_error():
    cfg = accumlab.TrainConfig(micro_batch_size=2, max_steps=1, parallel="fsdp", progress=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(8), cfg)


@pytest.mark.parametrize("settings, words", [
    ({"parallel": "fsdp", "precision": "fp16"}, "use precision='bf16'"),
    ({"parallel": "fsdp", "noise_scale": True}, "noise_scale=True"),
    ({"sync_every_micro_batch": True}, "applies to parallel='fsdp'"),
    ({"parallel": "zero3"}, "parallel must be one of"),
])
def test_settings_fsdp_cannot_honour_are_refused(settings, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        accumlab.TrainConfig(max_steps=1, **settings)


def test_transformer_blocks_are_found_for_gpt2_and_bert():
    gpt2, bert = make_model("gpt2", "tiny"), make_model("bert", "tiny")
    assert fsdp.transformer_blocks(gpt2) == list(gpt2.transformer.h)
    assert fsdp.transformer_blocks(bert) == list(bert.bert.encoder.layer)
    assert fsdp.transformer_blocks(torch.nn.Linear(2, 2)) == []
