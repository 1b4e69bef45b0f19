"""accumlab.ui.viz: figures carry exactly the numbers they were given (read trace data, not pixels)."""

import math
import subprocess
import sys

import plotly.graph_objects as go
import pytest

from accumlab.lab import memory
from accumlab.ui import viz

GIB = 2**30


def test_core_imports_neither_plotly_nor_ipywidgets():
    probe = ("import sys, accumlab, accumlab.lab.memory; accumlab.train; "
             "print(sorted(m for m in ('plotly', 'ipywidgets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_memory_figure_stacks_components_in_gib():
    shape = memory.ModelShape.gpt2("gpt2-small")
    sweep = memory.memory_sweep(shape, (1, 8, 64), 1024, "bf16")
    fig = viz.memory_figure(sweep, highlight=8, budget_gib=80, measured={1: 3.5, 8: 13.0})
    assert isinstance(fig, go.Figure)
    assert fig.layout.barmode == "stack"
    bars = {t.name: t for t in fig.data if t.type == "bar"}
    assert list(bars["activations"].x) == ["1", "8", "64"]
    assert bars["activations"].y == pytest.approx([r["activations"] / GIB for r in sweep])
    total = [sum(t.y[i] for t in bars.values()) for i in range(3)]
    assert total == pytest.approx([r["total"] / GIB for r in sweep])
    (points,) = [t for t in fig.data if t.type == "scatter"]
    assert list(points.x) == ["1", "8"] and list(points.y) == [3.5, 13.0]
    assert any(s.y0 == 80 for s in fig.layout.shapes)  # the budget line


def test_memory_figure_leaves_out_empty_components():
    sweep = memory.memory_sweep(memory.ModelShape.gpt2("tiny"), (1, 2), 64, "fp32")
    names = [t.name for t in viz.memory_figure(sweep).data]
    assert "16-bit weight copies" not in names  # zero in fp32
    assert "weights" in names


RECORDS = [
    {"precision": "fp64", "k": 1, "vs_single": 0.0, "vs_fp64": 0.0, "single_vs_fp64": 0.0},
    {"precision": "fp64", "k": 4, "vs_single": 2e-16, "vs_fp64": 2e-16, "single_vs_fp64": 0.0},
    {"precision": "fp32", "k": 1, "vs_single": 0.0, "vs_fp64": 3e-7, "single_vs_fp64": 3e-7},
    {"precision": "fp32", "k": 4, "vs_single": 1e-7, "vs_fp64": 2e-7, "single_vs_fp64": 3e-7},
]


def test_equivalence_figure_drops_zeros_on_its_log_axes():
    fig = viz.equivalence_figure(RECORDS)
    assert fig.layout.yaxis.type == "log" and fig.layout.xaxis.type == "log"
    names = [t.name for t in fig.data]
    # fp64's own error is zero everywhere: no dashed line for it
    assert names == ["fp64: accumulated vs single batch", "fp32: accumulated vs single batch",
                     "fp32: single batch vs fp64"]
    assert list(fig.data[0].y) == [None, 2e-16]
    assert list(fig.data[1].x) == [1, 4] and list(fig.data[1].y) == [None, 1e-7]
    assert fig.data[2].line.dash == "dash"


def test_comparison_bars_and_lines():
    fig = viz.comparison_bars({"a": 1e-7, "b": 0.0, "c": 3e-3})
    assert list(fig.data[0].x) == ["a", "b", "c"]
    assert list(fig.data[0].y) == [1e-7, None, 3e-3]
    lin = viz.comparison_bars({"a": 2.0}, log=False)
    assert list(lin.data[0].y) == [2.0]
    fig = viz.lines_figure({"s": ([1, 2, 3], [0.5, -1, math.nan])}, "x", "y", log_y=True)
    assert list(fig.data[0].y) == [0.5, None, None]


def test_loss_curves_one_line_per_run():
    runs = {"64 x 1": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}],
            "16 x 4": [{"step": 1, "loss": 3.0}]}
    fig = viz.loss_curves_figure(runs)
    assert [t.name for t in fig.data] == ["64 x 1", "16 x 4"]
    assert list(fig.data[0].y) == [3.0, 2.5] and list(fig.data[0].x) == [1, 2]


def test_partition_figure_numbers_micro_batches_across_windows():
    windows = [{"items": [5, 7], "stepped": True}, {"items": [3], "stepped": False}]
    fig = viz.partition_figure(windows)
    assert list(fig.data[0].x) == ["mb 1", "mb 2"] and list(fig.data[0].y) == [5, 7]
    assert list(fig.data[1].x) == ["mb 3"]
    assert fig.data[1].name == "window 2 (dropped)" and fig.data[1].marker.pattern.shape == "/"


def test_format_table():
    text = viz.format_table([{"k": 1, "x": 1.5e-7, "name": "fp32"}, {"k": 16, "x": None}],
                            formats={"x": ".1e"})
    lines = text.splitlines()
    assert lines[0].split() == ["k", "x", "name"]
    assert lines[2].split() == ["1", "1.5e-07", "fp32"]
    assert lines[3].split() == ["16", "-", "-"]
    assert viz.format_table([]) == "(no rows)"
    assert viz.format_table([{"v": 3}], formats={"v": lambda v: v * 2}).splitlines()[2].strip() \
        == "6"


def _builder_figures():
    """One figure from every builder in `viz.__all__` (a new builder must be added here)."""
    sweep = memory.memory_sweep(memory.ModelShape.gpt2("tiny"), (1, 2), 64, "bf16")
    by_length = [{**memory.predict_memory(memory.ModelShape.gpt2("tiny"), 1, s, "bf16"),
                  "seq_len": s} for s in (64, 128)]
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    return {
        "memory_figure": viz.memory_figure(sweep, highlight=2, budget_gib=1, measured={1: 0.1},
                                           title="a title"),
        "memory_by_length_figure": viz.memory_by_length_figure(by_length, highlight=64,
                                                               budget_gib=1, title="a title"),
        "equivalence_figure": viz.equivalence_figure(RECORDS, title="a title"),
        "comparison_bars": viz.comparison_bars({"fp32": 1e-7, "b": 2e-3}, title="a title"),
        "loss_curves_figure": viz.loss_curves_figure({f"run {i}": history for i in range(9)},
                                                     title="a title"),
        "lines_figure": viz.lines_figure({"fp32": ([1, 2], [1, 2]), "fp32 b": ([1], [2])},
                                         "x", "y", title="a title"),
        "partition_figure": viz.partition_figure([{"items": [5, 7]}], title="a title"),
    }


def _effective(fig, *path):
    """A layout property as plotly draws it: the figure's own value, else its template's."""
    for layout in (fig.layout, fig.layout.template.layout):
        value = layout
        for key in path:
            value = value[key] if value is not None else None
        if value is not None:
            return value
    return None


def test_every_builder_is_covered_by_the_style_test():
    builders = {n for n in viz.__all__ if n.endswith("_figure") or n == "comparison_bars"}
    assert builders == set(_builder_figures())


@pytest.mark.parametrize("name", sorted(_builder_figures()))
def test_every_figure_has_the_course_style_and_its_legend_clears_the_title(name):
    fig = _builder_figures()[name]
    assert fig.layout.template.to_plotly_json() == viz.TEMPLATE.to_plotly_json(), name
    # the title sits in the top margin, anchored at its top ...
    assert _effective(fig, "title", "yref") == "container"
    assert _effective(fig, "title", "yanchor") == "top" and _effective(fig, "title", "y") >= 0.9
    assert _effective(fig, "margin", "t") >= 2.5 * _effective(fig, "title", "font", "size")
    # ... and the legend lies right of the plot area from its top edge down, or below it
    right = (_effective(fig, "legend", "x") >= 1 and _effective(fig, "legend", "xanchor") == "left"
             and _effective(fig, "legend", "y") <= 1
             and _effective(fig, "legend", "yanchor") == "top")
    below = _effective(fig, "legend", "y") < 0 and _effective(fig, "legend", "yanchor") == "top"
    assert right or below, f"{name}: the legend can reach the title"


def test_precisions_keep_their_colour_in_every_figure():
    fig = viz.lines_figure({"bf16 measured": ([1], [1]), "bf16 predicted": ([1], [2]),
                            "other": ([1], [3])}, "x", "y")
    assert [t.line.color for t in fig.data[:2]] == [viz.PRECISION_COLORS["bf16"]] * 2
    assert [t.line.dash for t in fig.data[:2]] == ["solid", "dash"]  # told apart by dash
    assert fig.data[2].line.color not in viz.PRECISION_COLORS.values()
    bars = viz.comparison_bars({"fp16": 1e-3, "fp64": 1e-16})
    assert list(bars.data[0].marker.color) == [viz.PRECISION_COLORS[p] for p in ("fp16", "fp64")]
    assert viz.precision_color("fp32: accumulated vs single batch") == viz.PRECISION_COLORS["fp32"]
    assert viz.precision_color("fp320") is None
    assert viz.style(go.Figure()).layout.template.to_plotly_json() == \
        viz.TEMPLATE.to_plotly_json()


def test_log_bars_span_at_least_three_decades():
    fig = viz.comparison_bars({"a": 1.0e-7, "b": 1.25e-7})  # 25% apart
    low, high = fig.layout.yaxis.range
    assert high - low >= 3 and "log scale" in fig.layout.yaxis.title.text
