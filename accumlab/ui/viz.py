"""Plotly figure builders from plain records (lists and dicts); no training, no widgets.

Import it explicitly (``from accumlab.ui import viz``): the core package never imports plotly.
Every builder returns a `plotly.graph_objects.Figure` whose traces carry the numbers they were
given, so a test can read ``fig.data[i].y`` instead of looking at pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import plotly.graph_objects as go

GIB = 2**30
# One colour per precision, and per memory component, shared by all figures.
PRECISION_COLORS = {"fp64": "#1f77b4", "fp32": "#2ca02c", "tf32": "#17becf", "bf16": "#ff7f0e",
                    "fp16": "#d62728"}
MEMORY_PARTS = (
    ("weights", "weights", "#1f77b4"),
    ("gradients", "gradients", "#aec7e8"),
    ("optimizer", "optimizer states", "#9467bd"),
    ("weight_copies", "16-bit weight copies", "#c5b0d5"),
    ("activations", "activations", "#ff7f0e"),
    ("logits", "logits and loss", "#d62728"),
)
_LAYOUT = dict(template="plotly_white", height=380, margin=dict(l=60, r=20, t=50, b=50),
               legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))


def _positive_or_none(values: Sequence[float]) -> list[float | None]:
    """Zeros and non-finite values cannot sit on a log axis: leave a gap instead."""
    return [v if (v is not None and math.isfinite(v) and v > 0) else None for v in values]


def memory_figure(records: Sequence[Mapping], highlight: int | None = None,
                  budget_gib: float | None = None,
                  measured: Mapping[int, float] | None = None,
                  measured_name: str = "measured peak", title: str | None = None) -> go.Figure:
    """Stacked bars of memory components (bytes, from `accumlab.lab.memory.estimate_memory`)
    per micro-batch, in GiB; optional GPU budget line and measured peaks (GiB by micro-batch).
    """
    xs = [str(r["micro_batch"]) for r in records]
    fig = go.Figure()
    for key, name, color in MEMORY_PARTS:
        values = [r.get(key, 0) / GIB for r in records]
        if not any(values):
            continue
        fig.add_bar(x=xs, y=values, name=name, marker_color=color,
                    hovertemplate="%{y:.2f} GiB<extra>" + name + "</extra>")
    if measured:
        points = [(str(b), v) for b, v in measured.items() if str(b) in xs]
        fig.add_scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="markers",
                        name=measured_name, marker=dict(symbol="diamond", size=11,
                                                        color="black"))
    if budget_gib is not None:
        fig.add_hline(y=budget_gib, line_dash="dash", line_color="black",
                      annotation_text=f"{budget_gib:g} GiB", annotation_position="top left")
    if highlight is not None and str(highlight) in xs:
        fig.add_vrect(x0=xs.index(str(highlight)) - 0.45, x1=xs.index(str(highlight)) + 0.45,
                      fillcolor="gold", opacity=0.25, line_width=0)
    fig.update_layout(barmode="stack", xaxis_title="micro-batch size (sequences)",
                      yaxis_title="memory (GiB)", title=title, **_LAYOUT)
    fig.update_xaxes(type="category")
    return fig


def equivalence_figure(records: Sequence[Mapping], title: str | None = None) -> go.Figure:
    """Log-scale plot of `accumlab.compare_gradients` records against k.

    Solid lines: accumulated vs single batch in the same precision (`vs_single`). Dashed lines:
    that precision's own distance from the float64 gradient (`single_vs_fp64`). Zeros (k = 1
    against itself, fp64 against itself) are left out, as a log axis cannot show them.
    """
    fig = go.Figure()
    precisions = list(dict.fromkeys(r["precision"] for r in records))
    for p in precisions:
        rows = sorted((r for r in records if r["precision"] == p), key=lambda r: r["k"])
        ks = [r["k"] for r in rows]
        color = PRECISION_COLORS.get(p)
        fig.add_scatter(x=ks, y=_positive_or_none([r["vs_single"] for r in rows]),
                        mode="lines+markers", name=f"{p}: accumulated vs single batch",
                        line=dict(color=color))
        own = _positive_or_none([r["single_vs_fp64"] for r in rows])
        if any(v is not None for v in own):
            fig.add_scatter(x=ks, y=own, mode="lines", name=f"{p}: single batch vs fp64",
                            line=dict(color=color, dash="dash"))
    fig.update_layout(xaxis_title="accumulation steps k", yaxis_title="relative difference",
                      title=title, **_LAYOUT)
    fig.update_xaxes(type="log", dtick=math.log10(2), tickformat="d")
    fig.update_yaxes(type="log", exponentformat="power")
    return fig


def comparison_bars(values: Mapping[str, float], title: str | None = None,
                    y_title: str = "relative difference", log: bool = True) -> go.Figure:
    """One bar per named number (a log axis by default; zeros are left out)."""
    names = list(values)
    ys = _positive_or_none([values[n] for n in names]) if log else [values[n] for n in names]
    fig = go.Figure(go.Bar(x=names, y=ys, text=[f"{values[n]:.2e}" for n in names],
                           textposition="outside", marker_color="#1f77b4"))
    fig.update_layout(yaxis_title=y_title, title=title, showlegend=False, **_LAYOUT)
    if log:
        fig.update_yaxes(type="log", exponentformat="power")
    return fig


def loss_curves_figure(runs: Mapping[str, Sequence[Mapping]], y: str = "loss",
                       title: str | None = None) -> go.Figure:
    """One line per run: `y` of each history record (from `TrainResult.history`) by step."""
    fig = go.Figure()
    for name, history in runs.items():
        fig.add_scatter(x=[r["step"] for r in history], y=[r[y] for r in history],
                        mode="lines+markers", name=name)
    fig.update_layout(xaxis_title="optimizer step", yaxis_title=y, title=title, **_LAYOUT)
    return fig


def lines_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 x_title: str, y_title: str, title: str | None = None, log_x: bool = False,
                 log_y: bool = False, mode: str = "lines+markers") -> go.Figure:
    """Generic line plot: ``{name: (xs, ys)}``."""
    fig = go.Figure()
    for name, (xs, ys) in series.items():
        fig.add_scatter(x=list(xs), y=_positive_or_none(ys) if log_y else list(ys), mode=mode,
                        name=name)
    fig.update_layout(xaxis_title=x_title, yaxis_title=y_title, title=title, **_LAYOUT)
    if log_x:
        fig.update_xaxes(type="log")
    if log_y:
        fig.update_yaxes(type="log", exponentformat="power")
    return fig


def partition_figure(windows: Sequence[Mapping], title: str | None = None) -> go.Figure:
    """Items (tokens or examples) per micro-batch, grouped and coloured by window.

    Each window is ``{"items": [n_1, ..., n_j], "stepped": bool, ...}`` (see
    `accumlab.lab.equivalence.window_report`); a dropped window is drawn hatched.
    """
    fig = go.Figure()
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]
    index = 0
    for w, window in enumerate(windows):
        counts = list(window["items"])
        xs = [f"mb {index + j + 1}" for j in range(len(counts))]
        index += len(counts)
        stepped = window.get("stepped", True)
        fig.add_bar(x=xs, y=counts, name=f"window {w + 1}" + ("" if stepped else " (dropped)"),
                    marker=dict(color=palette[w % len(palette)],
                                pattern_shape="" if stepped else "/"))
    fig.update_layout(xaxis_title="micro-batch", yaxis_title="loss-bearing items",
                      title=title, **_LAYOUT)
    return fig


def format_table(records: Sequence[Mapping], columns: Sequence[str] | None = None,
                 formats: Mapping[str, str | Callable] | None = None) -> str:
    """A fixed-width text table of records (print it); `formats` maps a column to a format
    spec such as ``".2e"`` or to a function of the value."""
    if not records:
        return "(no rows)"
    columns = list(columns or records[0].keys())
    formats = dict(formats or {})

    def cell(column, value):
        f = formats.get(column)
        if value is None:
            return "-"
        if callable(f):
            return str(f(value))
        if f:
            return format(value, f)
        if isinstance(value, float):
            return f"{value:.3g}"
        return str(value)

    rows = [[cell(c, r.get(c)) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


__all__ = [
    "comparison_bars", "equivalence_figure", "format_table", "lines_figure",
    "loss_curves_figure", "memory_figure", "partition_figure",
]


def memory_by_length_figure(records: Sequence[Mapping], highlight: int | None = None,
                            budget_gib: float | None = None,
                            title: str | None = None) -> go.Figure:
    """Stacked bars of predicted memory components (`memory.predict_memory` records) by
    sequence length, in GiB; optional GPU budget line and a highlighted length."""
    xs = [str(r["seq_len"]) for r in records]
    fig = go.Figure()
    for key, name, color in MEMORY_PARTS:
        values = [r.get(key, 0) / GIB for r in records]
        if any(values):
            fig.add_bar(x=xs, y=values, name=name, marker_color=color,
                        hovertemplate="%{y:.2f} GiB<extra>" + name + "</extra>")
    if budget_gib is not None:
        fig.add_hline(y=budget_gib, line_dash="dash", line_color="black",
                      annotation_text=f"{budget_gib:.1f} GiB", annotation_position="top left")
    if highlight is not None and str(highlight) in xs:
        i = xs.index(str(highlight))
        fig.add_vrect(x0=i - 0.45, x1=i + 0.45, fillcolor="gold", opacity=0.25, line_width=0)
    fig.update_layout(barmode="stack", xaxis_title="sequence length (tokens)",
                      yaxis_title="predicted peak (GiB)", title=title, **_LAYOUT)
    fig.update_xaxes(type="category")
    return fig


__all__ += ["memory_by_length_figure"]
