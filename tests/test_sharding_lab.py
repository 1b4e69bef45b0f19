"""Lesson 13's arithmetic and panel (the two-process lab itself runs in the notebook's nbval)."""

import pytest

from accumlab.lab import errata
from accumlab.lab.sharding_lab import state_bytes_per_rank, trade_off


def test_zero_stages_reproduce_the_papers_7_5b_example_on_64_gpus():
    # ZeRO (Rajbhandari et al. 2019), figure 1: 120, 31.4, 16.6 and 1.88 GB per GPU
    got = state_bytes_per_rank(7.5e9, 64)
    assert got["ddp"] / 1e9 == pytest.approx(120)
    assert got["zero1"] / 1e9 == pytest.approx(31.4, abs=0.05)
    assert got["zero2"] / 1e9 == pytest.approx(16.6, abs=0.05)
    assert got["zero3"] / 1e9 == pytest.approx(1.88, abs=0.01)
    lesson_12 = errata.zero_model_state_bytes(int(7.5e9), 64)
    assert got == {"ddp": lesson_12["baseline"], **{z: lesson_12[z] for z in ("zero1", "zero2",
                                                                             "zero3")}}


def test_trade_off_sync_skipped_holds_the_whole_gradient_and_sends_less():
    ddp, skipped, every = trade_off(7e9, 8, 8)
    assert ddp["memory"] == 16 * 7e9
    assert every["memory"] == 16 * 7e9 / 8
    assert skipped["memory"] == 12 * 7e9 / 8 + 4 * 7e9  # shards + the whole float32 gradient
    assert skipped["sent"] < every["sent"]
    assert every["sent"] - skipped["sent"] == pytest.approx(7 * (7 / 8) * 4 * 7e9)
    one_skipped, one_every = trade_off(7e9, 8, 1)[1:]
    assert one_skipped == {**one_every, "setup": one_skipped["setup"]}  # k = 1: nothing to skip


def test_trade_off_panel_recomputes_on_every_control():
    pytest.importorskip("ipywidgets")
    from accumlab.ui.sharding_panel import trade_off_panel

    panel = trade_off_panel()
    first = panel.result["rows"][1]["memory"]
    panel.controls["ranks"].value = 64
    assert panel.result["rows"][1]["memory"] < first
    panel.controls["k"].value = 1
    assert panel.result["rows"][1]["memory"] == panel.result["rows"][2]["memory"]
    panel.controls["size"].value = "70B"
    assert "70B" in panel.view.figure.layout.title.text
    assert panel.error is None and panel.runs == 4
