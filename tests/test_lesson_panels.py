"""The panels of lessons 06-11 (accumlab.ui.lesson_panels), driven without a browser."""

import math

from accumlab.ui import lesson_panels


def _run(batch, rule, steps=5.0, noise=100.0):
    return {"batch": batch, "rule": rule, "micro_batch_size": 1, "accum_steps": batch,
            "lr": 1e-3, "reached": True, "steps": steps, "tokens": steps * batch * 25.0,
            "noise_scale_tokens": noise, "mean_length": 25.0,
            "evals": [(1, 8.0), (2, 7.5), (3, 7.0)]}


def test_batch_picker_answers_from_runs_made_and_trains_the_others():
    calls = []

    def train_run(batch, rule, callbacks=()):
        calls.append((batch, rule))
        for step in (1, 2):  # what the trainer tells its callbacks
            for c in callbacks:
                c.on_step_end({"step": step, "eval": {"loss": 7.5}})
        return _run(batch, rule, noise=math.nan if batch == 16 else 100.0)

    made = {(4, "sqrt"): _run(4, "sqrt"), (8, "sqrt"): _run(8, "sqrt")}
    panel = lesson_panels.batch_picker_panel(train_run, (4, 8, 16), ("sqrt", "linear"),
                                             runs=made, batch=8, target_loss=7.2)
    assert calls == [] and panel.result["run"] is made[(8, "sqrt")]
    assert "200 tokens = <b>2.0</b> × B_noise: <b>diminishing returns</b>" in panel.readout.value
    assert [t.name for t in panel.view.figure.data] == ["batch 4", "batch 8 (picked)"]

    panel.controls["rule"].value = "linear"  # not made yet: it trains, and says so
    assert calls == [(8, "linear")] and panel.result["run"]["rule"] == "linear"
    assert panel.runs == 2 and "done in" in panel.status.value
    panel.controls["rule"].value = "sqrt"
    panel.controls["rule"].value = "linear"  # made once: answered from the cache
    assert calls == [(8, "linear")]

    panel.controls["batch"].value = 16
    assert "not estimable" in panel.readout.value


def test_training_status_says_what_trains_and_why_it_takes_time():
    import ipywidgets as W

    status = W.HTML()
    writer = lesson_panels._TrainingStatus(status, "batch 64 with the linear rule")
    writer.on_step_end({"step": 3, "eval": {"loss": 7.41}})
    assert "training batch 64 with the linear rule" in status.value
    assert "a fresh model trains now" in status.value and "step 3" in status.value
    assert "7.41" in status.value


def test_underflow_explorer_recomputes_what_fp16_stores():
    import torch

    probs = torch.tensor([1e-2, 1e-5, 1e-8, 0.0])
    panel = lesson_panels.underflow_panel(vocab=50257, n_tokens=8192, p=1e-5,
                                          scale="none (1)", probs=probs)
    term = panel.result["term"]
    assert term["exact"] == 1e-5 / 8192 and term["stored"] == 0.0 and term["status"] == "zero"
    assert term["rel_error"] == 1.0 and "rounds to 0" in panel.readout.value
    # 1e-2 / 8192 = 1.2e-6 is a subnormal, 1e-5 / 8192 and 1e-8 / 8192 round to 0: 2 of 3
    assert panel.result["zero_share"] == 2 / 3
    panel.controls["scale"].value = "2^16 (torch's default)"
    term = panel.result["term"]
    assert term["status"] == "normal" and term["rel_error"] < 2**-11
    # scaled, even 1e-8 / 8192 * 65536 = 8e-8 is above half the smallest subnormal
    assert panel.result["zero_share"] == 0.0 and panel.result["unscaled_zero_share"] == 2 / 3
    panel.controls["p"].value = 1e-8
    panel.controls["n_tokens"].value = 524288  # 65536 * 1e-8 / 524288 = 1.25e-9: lost again
    assert panel.result["term"]["status"] == "zero"
    panel.controls["vocab"].value = 4096
    assert panel.result["uniform"]["exact"] == 1 / 4096 / 524288
    fig = panel.view.figure
    assert [t.name for t in fig.data][0] == "p / N (exact)" and len(fig.layout.shapes) == 4


def test_finetune_panel_trains_on_every_change_and_reports_progress():
    calls = []

    def train_run(micro, k, lr, callbacks=()):
        calls.append((micro, k, lr))
        for c in callbacks:
            c.on_train_begin({"total_steps": 3})
            c.on_step_end({"step": 1})
        steps = 256 // (micro * k)
        return {"steps": steps, "result": type("R", (), {"history": [
                    {"step": s, "loss": 1.0 / s} for s in range(1, steps + 1)]})(),
                "best": {"accuracy": 0.5, "f1": 0.4}}

    panel = lesson_panels.finetune_panel(train_run, micro=32, k=2, lr=2e-3)
    assert calls == [(32, 2, 2e-3)] and "b × k = <b>64</b>" in panel.readout.value
    panel.controls["micro"].value = 16
    assert calls[-1] == (16, 2, 2e-3) and panel.result["steps"] == 8
    assert len(panel.view.figure.data[0].x) == 8
    panel.controls["lr"].value = 1e-3
    assert calls[-1] == (16, 2, 1e-3) and len(calls) == 3
