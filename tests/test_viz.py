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
    probe = ("import sys, accumlab, accumlab.lab.memory; "
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
