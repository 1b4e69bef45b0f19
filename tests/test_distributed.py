"""Contract point 4: under DDP, one gradient all-reduce per window and N summed over ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import params_vector, random_lm_data, rel_diff
from safetensors.torch import load_model

import accumlab
from accumlab.engine.models import make_model

TESTS = Path(__file__).parent


def _torchrun(tmp_path, accum_steps: int, no_sync: str) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "ddp_worker.py"), str(tmp_path), str(accum_steps), no_sync]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "ddp.json").read_text())


def test_two_ranks_micro_2_k_2_equal_one_process_micro_8(tmp_path):
    report = _torchrun(tmp_path, accum_steps=2, no_sync="on")
    assert report["world"] == 2
    # 2 ranks x micro 2 x k 2 = 8 sequences per step, the same windows as one micro-batch of 8
    single = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    cfg = accumlab.TrainConfig(micro_batch_size=8, accum_steps=1, max_steps=3, lr=1e-2,
                               precision="fp64", shuffle=False, progress=False)
    result = accumlab.train(single, random_lm_data(48, seed=40), cfg)
    ddp = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    load_model(ddp, str(tmp_path / "ddp.safetensors"))
    assert rel_diff(params_vector(ddp), params_vector(single)) < 1e-10
    assert report["losses"] == pytest.approx(result.losses, rel=1e-10)  # L_W over both ranks
    # exactly one gradient all-reduce per window (one bucket: the tiny model fits in 25 MB)
    assert report["per_step"] == [1, 1, 1]


def test_without_no_sync_every_micro_batch_all_reduces(tmp_path):
    report = _torchrun(tmp_path, accum_steps=4, no_sync="off")
    assert report["per_step"] == [4, 4, 4]


def test_parallel_lab_counts_all_reduces_and_bytes_and_matches_one_process(tmp_path):
    """accumlab.lab.parallel_lab (notebook 09's worker): 2 ranks under torchrun, k = 1 and 2."""
    from accumlab.lab import parallel_lab

    report = parallel_lab.launch(str(tmp_path), nproc=2, micro=2, ks=(1, 2), steps=2)
    rows = {r["run"]: r for r in parallel_lab.communication_table(report)}
    assert rows["k1_no_sync"]["all_reduces_per_step"] == 1
    assert rows["k2_no_sync"]["all_reduces_per_step"] == 1
    assert rows["k2_sync_every_micro_batch"]["all_reduces_per_step"] == 2
    for row in rows.values():  # measured bytes = all-reduces x all gradient bytes
        assert row["bytes_per_step"] == row["predicted_bytes_per_step"] > 0
    assert rows["k2_no_sync"]["bytes_per_token"] < rows["k1_no_sync"]["bytes_per_token"]
    ref = parallel_lab.single_process(ranks=2, micro=2, accum_steps=2, steps=2)
    assert rel_diff(report["params"]["k2_no_sync"], ref["params"]) < 1e-10
    assert rel_diff(report["params"]["k2_sync_every_micro_batch"], ref["params"]) < 1e-10


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict:
    """One torchrun launch of 2 ranks that meets both faults (see ddp_fault_worker.py)."""
    out = tmp_path_factory.mktemp("faults")
    env = dict(os.environ, PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "ddp_fault_worker.py"), str(out)]
    subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    return {p.name: p.read_text() for p in out.iterdir()}


def test_ranks_with_datasets_of_different_sizes_stop_at_the_start(faults):
    for rank in ("0", "1"):
        said = faults[f"lengths-{rank}"]
        assert said.startswith("ValueError: the ranks hold train_data of different sizes")
        assert "rank 0 has 48, rank 1 has 40 examples" in said


def test_a_frozen_rank_times_out_with_a_message_naming_rank_and_step(faults):
    # without a timeout rank 0 would wait 30 minutes (torch's default) for rank 1
    assert faults["freeze-0"].startswith(
        "CollectiveError: rank 0 of 2: a collective operation failed at optimizer step 3 "
        "(collective_timeout_s=3)")
    assert "frozen, dead" in faults["freeze-0"]
    assert "freeze-1" not in faults  # still asleep when torchrun ended it
