"""benchmarks/bench_frameworks.py in its CPU CI mode: three sides, same steps, same arithmetic.

accumlab.train, Hugging Face's Trainer and a plain loop train the same initial weights on the
same packed corpus blocks with the same token-normalised loss, AdamW and clipping, so their
trained models agree to float rounding (bitwise, measured with one thread on CPU).
No test asserts a speed.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_frameworks.py"

pytest.importorskip("accelerate")  # the Trainer needs it


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-ci", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_all_three_sides_ran_the_same_number_of_steps(ci_run):
    _, report = ci_run
    spec = report["spec"]
    total = spec["warmup"] + spec["steps"]
    sides = report["sides"]
    assert set(sides) == {"accumlab", "trainer", "plain"}
    for name, rec in sides.items():
        assert rec["steps"] == [total], (name, rec["steps"])
        assert rec["rounds"] == spec["rounds"]
    runs = report["runs"]
    assert len(runs) == 3 * spec["rounds"] and all("error" not in r for r in runs)


def test_the_table_prints_ratios_against_the_trainer(ci_run):
    stdout, report = ci_run
    header = next(line for line in stdout.splitlines() if line.startswith("side "))
    assert "speed/Trainer" in header and "GFLOP/s" in header and "final loss" in header
    rows = {line.split()[0]: line.split() for line in stdout.splitlines()
            if line.split() and line.split()[0] in report["sides"]}
    assert set(rows) == {"accumlab", "trainer", "plain"}
    assert rows["trainer"][-3] == "1.000"  # the baseline's own speed ratio
    for name, rec in report["sides"].items():
        assert rec["speed_vs_trainer"] == pytest.approx(
            rec["tokens_per_s"] / report["sides"]["trainer"]["tokens_per_s"])
        assert rec["speed_vs_trainer"] > 0 and rec["gflops"] > 0
        assert f"{rec['speed_vs_trainer']:.3f}" in rows[name]


def test_final_losses_agree_and_training_moved_them(ci_run):
    _, report = ci_run
    losses = {name: rec["final_loss"] for name, rec in report["sides"].items()}
    # measured: bitwise equal (rel diff 0.0) with one thread; allow for summation order
    ref = losses["trainer"]
    for loss in losses.values():
        assert abs(loss - ref) / ref < 1e-5, losses
    assert ref < math.log(4096) - 0.3, "the CI run should train: the loss barely moved"
    for rec in report["sides"].values():  # every round ends at the same weights
        assert rec["final_loss_spread"] < 1e-6


# ------------------------------------------------------------- accumlab.lab.throughput (no GPU)


def test_flops_per_token_of_gpt2_small_matches_the_anchor():
    import torch

    from accumlab.engine.models import make_model
    from accumlab.lab import throughput

    with torch.device("meta"):
        shape = throughput.model_shape(make_model("gpt2", "gpt2-small", max_positions=1024))
    assert shape[1:] == (12, 768)
    flops = throughput.flops_per_token(*shape, 1024)
    assert flops == 6 * shape[0] + 12 * 12 * 768 * 1024
    assert 0.85e9 < flops < 0.87e9  # the anchor: 0.860 GFLOP per token


def test_peak_flops_by_device_name_and_mfu():
    from accumlab.lab import throughput

    assert throughput.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe") == 756e12  # the longer key wins
    assert throughput.peak_flops("Some CPU") is None
    assert throughput.mfu(1000.0, 2e9, None) is None
    assert throughput.mfu(379_000, 0.86e9, 989e12) == pytest.approx(0.3296, rel=1e-3)


def test_accum_steps_give_exactly_the_target_or_say_why_not():
    from accumlab.lab import throughput

    assert throughput.accum_steps_for(64, 16) == 4
    assert throughput.accum_steps_for(64, 8, ranks=2) == 4
    with pytest.raises(ValueError, match="does not divide 64 sequences: k = 2 or 3 gives an "
                                         "effective batch of 48 or 72"):
        throughput.accum_steps_for(64, 24)
    with pytest.raises(ValueError, match="one micro-batch already holds 16 sequences"):
        throughput.accum_steps_for(8, 16)
    with pytest.raises(ValueError, match=">= 1"):
        throughput.accum_steps_for(64, 0)


def test_fastest_fitting_ignores_sizes_that_did_not_fit():
    from accumlab.lab import throughput

    records = [{"micro_batch": 4, "fits": True, "tokens_per_s": 10.0},
               {"micro_batch": 8, "fits": True, "tokens_per_s": 12.0},
               {"micro_batch": 16, "fits": True, "tokens_per_s": 11.0},
               {"micro_batch": 32, "fits": False, "tokens_per_s": None}]
    assert throughput.fastest_fitting(records)["micro_batch"] == 8
    with pytest.raises(ValueError, match="no micro-batch fitted"):
        throughput.fastest_fitting(records[3:])
    # only sizes that divide the target batch: of 4, 8 and 16 only 4 divides 20
    assert throughput.fastest_fitting(records, divides=20)["micro_batch"] == 4
    assert throughput.fastest_fitting(records, divides=16, ranks=2)["micro_batch"] == 8
    with pytest.raises(ValueError, match="that divides 6 sequences"):
        throughput.fastest_fitting(records, divides=6)


def test_try_micro_batches_measures_each_size_and_a_budget_rules_sizes_out():
    import torch

    from accumlab.engine.models import make_model
    from accumlab.lab import throughput

    torch.set_num_threads(1)
    data = throughput.corpus_blocks(16, 8)
    assert all(len(d["input_ids"]) == 16 for d in data)
    records = throughput.try_micro_batches(lambda: make_model("gpt2", "tiny"), data, (2, 1),
                                           steps=2, device="cpu")
    assert [r["micro_batch"] for r in records] == [1, 2]
    assert all(r["fits"] and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0
               for r in records)
    over = throughput.try_micro_batches(lambda: make_model("gpt2", "tiny"), data, (1, 2),
                                        steps=2, device="cpu", budget_mb=1.0)
    assert [r["fits"] for r in over] == [False]  # stops at the first size over budget
