"""accumlab.lab.planner: plan_training, parse_bytes and the out-of-memory-safe search."""

import pytest
import torch

from accumlab.engine.models import make_model
from accumlab.lab import memory
from accumlab.lab.planner import PlanError, find_largest_micro_batch, parse_bytes, plan_training

GIB = memory.GIB
GPT2 = memory.ModelShape.named("gpt2-small")


@pytest.mark.parametrize("text, expected", [
    ("16GB", 16 * 10**9), ("16GiB", 16 * GIB), ("80G", 80 * GIB), ("1.5 GiB", int(1.5 * GIB)),
    ("512MiB", 512 * 2**20), ("80gb", 80 * 10**9), (1000, 1000),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["16XB", "GB", "", "-3GB", "1e3GB"])
def test_parse_bytes_names_the_accepted_forms(text):
    with pytest.raises(ValueError, match="16GiB"):
        parse_bytes(text)


def test_plan_for_gpt2_small_on_16gb_fits_and_the_next_micro_batch_does_not():
    plan = plan_training("16GB", GPT2, 1024, 524_288)
    assert plan.micro_batch * plan.accum_steps == 512 and plan.tokens_per_step == 524_288
    assert plan.predicted["total"] <= plan.budget_bytes < plan.gpu_memory_bytes
    assert plan.next_up["micro_batch"] == 2 * plan.micro_batch
    assert plan.next_up["total"] > plan.budget_bytes
    assert not plan.checkpointing
    text = str(plan)
    assert f"micro-batch {plan.micro_batch} x {plan.accum_steps} accumulation steps" in text
    assert "524,288 tokens per optimizer step" in text and "over the budget" in text


def test_more_memory_gives_a_bigger_micro_batch_and_fewer_steps():
    small = plan_training("16GB", GPT2, 1024, 524_288)
    big = plan_training("80GB", GPT2, 1024, 524_288)
    assert big.micro_batch > small.micro_batch and big.accum_steps < small.accum_steps


def test_ranks_split_the_batch_and_micro_batch_divides_it():
    plan = plan_training("24GiB", GPT2, 1024, 96 * 1024, ranks=4)
    assert plan.effective_batch == 96 and 24 % plan.micro_batch == 0
    with pytest.raises(ValueError, match="ranks"):
        plan_training("24GiB", GPT2, 1024, 10 * 1024, ranks=4)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        plan_training("24GiB", GPT2, 1024, 3000)


def test_auto_checkpointing_turns_on_only_when_micro_batch_1_does_not_fit():
    shape = memory.ModelShape.named("gpt2-medium")
    off = memory.predict_memory(shape, 1, 1024)
    on = memory.predict_memory(shape, 1, 1024, checkpointing=True)
    gpu = int((off["total"] + on["total"]) / 2 / 0.9)  # fits only with checkpointing
    plan = plan_training(gpu, shape, 1024, 64 * 1024)
    assert plan.checkpointing and plan.micro_batch >= 1
    assert "not even micro-batch 1 fits" in str(plan)
    with pytest.raises(PlanError):
        plan_training(gpu, shape, 1024, 64 * 1024, checkpointing="off")
    roomy = plan_training("80GB", shape, 1024, 64 * 1024)
    assert not roomy.checkpointing


def test_nothing_fits_says_what_to_change():
    with pytest.raises(PlanError, match="model states alone exceed"):
        plan_training("16GB", memory.ModelShape.named("llama-3.1-8b"), 4096, 4096 * 64)
    shape = memory.ModelShape.named("gpt2-small")
    one = memory.predict_memory(shape, 1, 1024, checkpointing=True)
    with pytest.raises(PlanError, match=r"A sequence length of \d+ would fit") as err:
        plan_training(int(one["total"] * 0.95), shape, 1024, 1024 * 8)
    assert "chunked loss (loss_chunk_size=128)" in str(err.value)


# ---------------------------------------------------------------- the measured search


def _fake_step(threshold, calls):
    def step(micro_batch):
        calls.append(micro_batch)
        if micro_batch > threshold:
            raise torch.OutOfMemoryError(f"CUDA out of memory at {micro_batch}")
    return step


@pytest.mark.parametrize("threshold", [1, 2, 5, 12, 33, 64, 100])
def test_search_finds_the_threshold_by_doubling_then_bisecting(threshold):
    calls = []
    result = find_largest_micro_batch(_fake_step(threshold, calls), limit=100)
    assert result["largest"] == threshold
    assert [n for n, _ in result["tries"]] == calls
    assert all(ok == (n <= threshold) for n, ok in result["tries"])
    doubling = [n for n in calls if n & (n - 1) == 0]
    assert doubling[:3] == [1, 2, 4][:len(doubling[:3])]
    assert len(calls) <= 2 * 7 + 1  # log2 steps up, log2 steps of bisection


def test_search_when_nothing_fits_and_other_errors_propagate():
    assert find_largest_micro_batch(_fake_step(0, []))["largest"] == 0
    assert find_largest_micro_batch(_fake_step(10, []), start=4, limit=6)["largest"] == 6

    def broken(micro_batch):
        raise RuntimeError("a real bug")
    with pytest.raises(RuntimeError, match="a real bug"):
        find_largest_micro_batch(broken)
    with pytest.raises(ValueError):
        find_largest_micro_batch(broken, start=0)


def test_search_on_cpu_with_a_real_step_guarded_by_a_byte_budget():
    torch.set_num_threads(1)
    model = make_model("gpt2", "tiny")
    shape = memory.ModelShape.from_model(model)
    seq_len = 32
    budget = memory.predict_memory(shape, 6, seq_len, "fp32", device="cpu")["total"]
    measured = {}

    def step(micro_batch):
        ids = torch.randint(2, shape.vocab, (micro_batch, seq_len))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        peak = memory.measure_peak_memory(model, batch, "fp32")["peak"]
        measured[micro_batch] = peak
        if peak > budget:
            raise torch.OutOfMemoryError(f"{peak} bytes over the {budget} byte budget")

    result = find_largest_micro_batch(step, limit=16)
    largest = result["largest"]
    assert measured[largest] <= budget < measured[largest + 1]
    assert abs(largest - 6) <= 1  # the model's prediction agrees with the measurement


def test_long_sequence_panel_follows_the_planner():
    from accumlab.ui import widgets

    panel = widgets.long_sequence_panel(gpu="24GB", seq_len=1024, figure_mode="output")
    plan = plan_training("24GB", memory.ModelShape(**{**GPT2.to_dict(), "positions": 8192}),
                         1024, 2**19)
    assert panel.result["plan"].micro_batch == plan.micro_batch
    assert f"micro-batch <b>{plan.micro_batch}</b>" in panel.readout.value
    panel.controls["seq_len"].value = 8192
    assert panel.result["plan"].micro_batch == 1
    panel.controls["gpu"].value = "12GB"
    panel.controls["checkpointing"].value = "off"
    assert panel.result["plan"] is None and "nothing fits" in panel.readout.value
    sweep = panel.result["sweep"]
    assert [r["seq_len"] for r in sweep] == list(widgets.LONG_SEQ_LENS)
    assert all(a["total"] < b["total"] for a, b in zip(sweep, sweep[1:]))
