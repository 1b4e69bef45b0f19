"""accumlab.ui.widgets without a browser: set a control's value, read the panel's result.

Each panel's callback must be a thin call into the library: the tests compare what a panel
shows with what the library function returns for the same arguments.
"""

import json
import sys

import ipywidgets as W
import plotly.graph_objects as go
import pytest
import torch
from helpers import random_lm_data

import accumlab
from accumlab import compare_gradients
from accumlab.engine.models import make_model
from accumlab.lab import memory
from accumlab.lab.equivalence import GradientComparison
from accumlab.lab.planner import plan_training
from accumlab.ui import viz, widgets

GIB = memory.GIB


@pytest.fixture(params=["widget", "output"])
def figure_mode(request, monkeypatch):
    monkeypatch.setenv("ACCUMLAB_FIGURES", request.param)
    return request.param


def _sliders(panel):
    return [c for c in panel.controls.values() if isinstance(c, (W.IntSlider, W.SelectionSlider))]


def test_figure_mode_resolution(monkeypatch):
    monkeypatch.delenv("ACCUMLAB_FIGURES", raising=False)
    assert widgets.figure_mode() == "output"  # a FigureWidget saves plotly.js in the notebook
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert widgets.figure_mode() == "output"
    monkeypatch.setenv("ACCUMLAB_FIGURES", "widget")
    assert widgets.figure_mode() == "widget"
    assert widgets.figure_mode("output") == "output"
    with pytest.raises(ValueError, match="figure mode"):
        widgets.figure_mode("svg")


def test_default_panels_save_small():
    """The widget state JupyterLab saves with a notebook: a FigureWidget's holds plotly.js."""
    def state_bytes(widget):
        return len(json.dumps(widget.get_state(), default=lambda b: "x" * len(bytes(b))))

    default = widgets.FigureView(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))
    assert isinstance(default.widget, W.Output) and state_bytes(default.widget) < 50_000
    live = widgets.FigureView(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])), mode="widget")
    assert state_bytes(live.widget) > 2**20  # why it is not the default


def test_figure_view_redraws_in_place_and_with_new_traces(figure_mode):
    view = widgets.FigureView(go.Figure(go.Scatter(x=[1, 2], y=[3, 4])))
    assert view.mode == figure_mode
    view.update(go.Figure(go.Scatter(x=[1, 2], y=[5, 6])))  # same structure
    view.update(go.Figure([go.Bar(x=["a"], y=[1]), go.Bar(x=["a"], y=[2])]))  # new structure
    assert [list(t.y) for t in view.figure.data] == [[1], [2]]
    if figure_mode == "widget":
        assert isinstance(view.widget, go.FigureWidget)
        assert [list(t.y) for t in view.widget.data] == [[1], [2]]
    else:  # the Output holds the figure itself: nothing is printed into the running cell
        assert isinstance(view.widget, W.Output)
        (shown,) = view.widget.outputs
        drawn = shown["data"]["application/vnd.plotly.v1+json"]["data"]
        assert [list(t["y"]) for t in drawn] == [[1], [2]]


def test_plan_panel_is_a_thin_call(figure_mode):
    panel = widgets.plan_panel(256, 12)
    assert panel.result == memory.plan_accumulation(256, 12)
    assert "effective batch <b>256</b>" in panel.readout.value
    assert panel.status.value.startswith("<i>done in")
    panel.controls["max_micro_batch"].value = 48
    assert panel.result == memory.plan_accumulation(256, 48)
    assert panel.runs == 2
    assert all(not s.continuous_update for s in _sliders(panel))


def test_sliders_leave_their_track_room_beside_the_description():
    """A long description with ipywidgets' default width left a track about 20 px wide."""
    panel = widgets.plan_panel(256, 12)
    for s in _sliders(panel):
        width = int(s.layout.width.removesuffix("px"))
        assert width - 7 * len(s.description) >= 250, (s.description, s.layout.width)
        assert s.style.description_width == "initial"


def test_memory_panel_predicts_with_the_validated_model_and_plans(figure_mode):
    panel = widgets.memory_panel(size="gpt2-small", micro_batch=8, seq_len=1024,
                                 precision="bf16", attention="eager", gpu_gib=80)
    shape = memory.ModelShape.gpt2("gpt2-small")
    assert panel.result["chosen"] == memory.predict_memory(shape, 8, 1024, "bf16",
                                                           attention="eager")
    assert panel.result["fits"] and "fits in 80 GiB" in panel.readout.value
    plan = plan_training(80 * GIB, shape, 1024, 256 * 1024, "bf16", attention="eager",
                         checkpointing="off")
    assert (panel.result["plan"].micro_batch, panel.result["plan"].accum_steps) == \
        (plan.micro_batch, plan.accum_steps)
    assert f"micro-batch <b>{plan.micro_batch}</b>" in panel.readout.value
    panel.controls["micro_batch"].value = 64
    assert not panel.result["fits"] and "does not fit" in panel.readout.value
    bars = {t.name: t for t in panel.view.figure.data}
    expected = [r["activations"] / GIB for r in panel.result["sweep"]]
    assert list(bars["activations"].y) == pytest.approx(expected)
    eager = panel.result["chosen"]["activations"]
    panel.controls["attention"].value = "sdpa"
    assert panel.result["chosen"]["activations"] < eager
    panel.controls["gpu_gib"].value = 8
    panel.controls["seq_len"].value = 4096
    assert panel.result["plan"] is None and "Planner:" in panel.readout.value
    panel.controls["size"].value = "tiny"
    assert panel.result["parameters"] == memory.ModelShape.gpt2("tiny", positions=4096).parameters
    assert all(not s.continuous_update for s in _sliders(panel))


def test_panel_shows_errors_instead_of_raising():
    control = W.IntSlider(value=1, continuous_update=False)

    def compute(x):
        if x > 1:
            raise ValueError("too big")
        return x

    panel = widgets.Panel({"x": control}, compute, describe=str)
    assert panel.result == 1 and panel.error is None
    control.value = 2
    assert isinstance(panel.error, ValueError) and "too big" in panel.status.value
    assert "accumlab-running" not in panel.widget._dom_classes
    control.value = 1
    assert panel.error is None and panel.readout.value == "1"


@pytest.fixture(scope="module")
def tiny_gpt2():
    return make_model("gpt2", "tiny", seed=0, dtype=torch.float64)


def test_equivalence_panel_matches_compare_gradients(figure_mode, tiny_gpt2):
    data = random_lm_data(8, seed=3, max_len=12)
    panel = widgets.equivalence_panel(tiny_gpt2, data, ks=(1, 2, 4, 8, 16),
                                      precisions=("fp64", "fp32"), k=2, precision="fp64",
                                      pad_token_id=1)
    assert [o for o in panel.controls["k"].options] == [1, 2, 4, 8]  # k <= examples
    assert panel.result["vs_single"] < 1e-12
    panel.controls["precision"].value = "fp32"
    panel.controls["k"].value = 4
    (expected,) = compare_gradients(tiny_gpt2, data, ks=(4,), precisions=("fp32",),
                                    pad_token_id=1)
    assert {key: panel.result[key] for key in expected} == pytest.approx(expected)
    assert panel.result["items"] == sum(len(e["labels"]) - 1 for e in data)  # after the shift
    assert f"(N = {panel.result['items']} loss items), k = 4, fp32" in panel.readout.value
    ys = list(panel.view.figure.data[0].y)
    assert ys == pytest.approx([expected["vs_single"], expected["single_vs_fp64"],
                                expected["vs_fp64"]])
    assert panel.view.figure.layout.yaxis.type != "log"  # three numbers of one order: linear
    assert panel.runs == 3


def test_equivalence_panel_varies_length_and_size_and_reuses_gradients(tiny_gpt2):
    made = []

    def make(seq_len, n):
        made.append((seq_len, n))
        return random_lm_data(n, seed=seq_len, min_len=seq_len // 2, max_len=seq_len)

    table = GradientComparison(tiny_gpt2, make(12, 8), pad_token_id=1)
    table.record("fp32", 2)  # what the lesson's table computed before the panel
    panel = widgets.equivalence_panel(tiny_gpt2, make, ks=(1, 2, 4), precisions=("fp64", "fp32"),
                                      k=2, precision="fp32", pad_token_id=1,
                                      seq_lens=(6, 9, 12), sizes=(4, 8), seq_len=12,
                                      n_examples=8, comparison=table)
    assert panel.result["vs_single"] == table.records[("fp32", 2)]["vs_single"]
    assert made == [(12, 8)]  # the table's examples were reused, not made again
    seen = []
    panel.status.observe(lambda change: seen.append(change["new"]), names="value")
    panel.controls["seq_len"].value = 6
    assert made[-1] == (6, 8) and panel.result["seq_len"] == 6
    assert [m for m in seen if "gradient" in m] == [
        "<i>running… gradient 1 of 3: the float64 single batch (the reference)</i>",
        "<i>running… gradient 2 of 3: the single batch in fp32</i>",
        "<i>running… gradient 3 of 3: 2 accumulated micro-batches in fp32</i>"]
    (expected,) = compare_gradients(tiny_gpt2, make(6, 8), ks=(2,), precisions=("fp32",),
                                    pad_token_id=1)
    assert {key: panel.result[key] for key in expected} == pytest.approx(expected)
    seen.clear()
    panel.controls["k"].value = 4  # same examples: only the new window is computed
    assert [m for m in seen if "gradient" in m] == [
        "<i>running… gradient 1 of 1: 4 accumulated micro-batches in fp32</i>"]
    panel.controls["n_examples"].value = 4
    assert panel.result["examples"] == 4 and panel.result["k"] == 4
    calls, seen[:] = len(made), []
    panel.controls["n_examples"].value = 8  # back to settings already computed: nothing new
    assert len(made) == calls and not [m for m in seen if "gradient" in m]
    assert panel.result["examples"] == 8 and panel.result["seq_len"] == 6
    assert "s = 6, 8 examples, k = 4, fp32" in panel.view.figure.layout.title.text
    panel.controls["n_examples"].value = 4
    panel.controls["seq_len"].value = 12
    panel.controls["seq_len"].value = 9  # a fourth setting: the oldest, (6, 8), is dropped ...
    panel.controls["n_examples"].value = 8
    panel.controls["seq_len"].value = 12  # ... but the table's examples are always kept
    assert made.count((12, 8)) == 1 and panel.result["k"] == 4
    panel.controls["seq_len"].value = 6
    assert made.count((6, 8)) == 3  # the check above, then made again after being dropped


def test_partition_panel_windows_and_policies(figure_mode, tiny_gpt2):
    data = random_lm_data(7, seed=4, max_len=10)
    panel = widgets.partition_panel(tiny_gpt2, data, pad_token_id=1, micro_batch_size=2,
                                    accum_steps=2)
    windows = panel.result  # micro-batches of 2,2 | 2,1: the second window is full
    assert [len(w["items"]) for w in windows] == [2, 2]
    assert all(w["rel_diff"] < 1e-12 and w["stepped"] for w in windows)
    panel.controls["accum_steps"].value = 3  # 4 micro-batches: windows of 3 and 1
    assert [len(w["items"]) for w in panel.result] == [3, 1]
    assert panel.result[-1]["partial"] and panel.result[-1]["stepped"]
    panel.controls["partial_window"].value = "drop"
    assert not panel.result[-1]["stepped"]
    assert "<b>1</b> optimizer step" in panel.readout.value
    dropped = panel.result
    panel.controls["normalization"].value = "mean_of_means"
    assert max(w["rel_diff"] for w in panel.result) > 1e-6  # unequal token counts
    counts = [n for w in panel.result for n in w["items"]]
    assert [y for t in panel.view.figure.data for y in t.y] == counts
    panel.controls["normalization"].value = "tokens"
    assert panel.result is dropped  # a setting seen before answers without recomputing
    assert all(p.grad is None for p in tiny_gpt2.parameters())


def test_live_loss_plot_draws_each_run_while_it_trains(figure_mode):
    data = random_lm_data(32, seed=5)
    live = widgets.LiveLossPlot(title="loss")
    seen = []

    class Spy:  # runs after the live plot: the figure already holds this step
        def on_step_end(self, record):
            seen.append(len(live.view.figure.data[-1].y))

    init = make_model("gpt2", "tiny", seed=0)
    results = {}
    for micro, steps in ((8, 1), (2, 4)):
        cfg = accumlab.TrainConfig(micro_batch_size=micro, accum_steps=steps, max_steps=3,
                                   lr=1e-3, progress=False, shuffle=False)
        model = make_model("gpt2", "tiny", seed=0)
        model.load_state_dict(init.state_dict())
        results[f"{micro} x {steps}"] = accumlab.train(model, data, cfg, callbacks=[live, Spy()])
    assert seen == [1, 2, 3, 1, 2, 3]
    assert list(live.runs) == ["8 x 1", "2 x 4"]
    for name, result in results.items():
        assert [r["loss"] for r in live.runs[name]] == result.losses
    fig = live.view.figure
    assert [t.name for t in fig.data] == ["8 x 1", "2 x 4"]
    assert list(fig.data[1].y) == results["2 x 4"].losses
    assert live.status.value.startswith("<i>done")
    live.named("custom")
    accumlab.train(make_model("gpt2", "tiny"), data,
                   accumlab.TrainConfig(micro_batch_size=8, max_steps=1, progress=False),
                   callbacks=[live])
    assert "custom" in live.runs


def test_panels_display_as_widgets():
    panel = widgets.plan_panel()
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    live = widgets.LiveLossPlot()
    assert "application/vnd.jupyter.widget-view+json" in live._repr_mimebundle_()
    assert isinstance(viz.loss_curves_figure(live.runs), go.Figure)
