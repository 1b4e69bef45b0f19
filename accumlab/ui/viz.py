"""Plotly figure builders from plain records (lists and dicts); no training, no widgets.

Import it explicitly (``from accumlab.ui import viz``): the core package never imports plotly.
Every builder returns a `plotly.graph_objects.Figure` whose traces carry the numbers they were
given, so a test can read ``fig.data[i].y`` instead of looking at pixels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence

import plotly.graph_objects as go
import plotly.io as pio

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
# Lines that are not a precision take these, so that a colour never means two things at once.
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#393b79", "#637939",
                "#843c39")

# The course's one plot style. The title sits in the top margin (`yref="container"`) and the
# legend to the right of the plot area, starting at its top edge: however many entries it
# has, it grows downwards and never covers the title (tests/test_viz.py checks every builder).
TEMPLATE = go.layout.Template(pio.templates["plotly_white"])
TEMPLATE.layout.update(
    font=dict(family="Arial, Helvetica, sans-serif", size=13, color="#222"),
    title=dict(x=0, xref="paper", xanchor="left", y=0.98, yref="container", yanchor="top",
               font=dict(size=15)),
    margin=dict(l=70, r=20, t=60, b=55, autoexpand=True),
    legend=dict(orientation="v", x=1.02, xanchor="left", y=1, yanchor="top",
                font=dict(size=12)),
    colorway=list(OTHER_COLORS), height=380,
)
pio.templates["accumlab"] = TEMPLATE
_LAYOUT = dict(template=TEMPLATE)


def style(fig: go.Figure) -> go.Figure:
    """Give a figure built outside this module the course's plot style (returns `fig`)."""
    fig.update_layout(template=TEMPLATE)
    return fig


def precision_color(name: str) -> str | None:
    """The fixed colour of the precision that `name` starts with ("fp32", "bf16: k = 4" ...)."""
    match = re.match(r"(fp64|fp32|tf32|bf16|fp16)\b", name)
    return PRECISION_COLORS[match.group(1)] if match else None


def _line_styles(names: Sequence[str]) -> list[dict]:
    """A line style per trace: its precision's colour where the name starts with one (the
    second and third lines of a colour dashed and dotted), else the next other colour."""
    styles, seen, others = [], {}, iter(OTHER_COLORS * 4)
    for name in names:
        color = precision_color(str(name)) or next(others)
        dash = ("solid", "dash", "dot", "dashdot")[seen.get(color, 0) % 4]
        seen[color] = seen.get(color, 0) + 1
        styles.append(dict(color=color, dash=dash))
    return styles


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
    """One bar per named number, each labelled with its value; a bar named by a precision
    takes its colour. On the log axis (the default; zeros are left out) the range spans at
    least three whole decades, so that values 25% apart do not look ten times apart."""
    names = list(values)
    ys = _positive_or_none([values[n] for n in names]) if log else [values[n] for n in names]
    colors = [precision_color(str(n)) or OTHER_COLORS[0] for n in names]
    fig = go.Figure(go.Bar(x=names, y=ys, text=[f"{values[n]:.2e}" for n in names],
                           textposition="outside", marker_color=colors))
    fig.update_layout(yaxis_title=y_title, title=title, showlegend=False, **_LAYOUT)
    positive = [v for v in ys if v is not None] if log else []
    if positive:
        top = math.ceil(math.log10(max(positive)))
        bottom = min(math.floor(math.log10(min(positive))), top - 3)
        fig.update_yaxes(type="log", exponentformat="power", range=[bottom, top + 0.5],
                         title=f"{y_title} (log scale)")
    elif log:
        fig.update_yaxes(type="log", exponentformat="power", title=f"{y_title} (log scale)")
    return fig


def loss_curves_figure(runs: Mapping[str, Sequence[Mapping]], y: str = "loss",
                       title: str | None = None) -> go.Figure:
    """One line per run: `y` of each history record (from `TrainResult.history`) by step."""
    fig = go.Figure()
    for (name, history), line in zip(runs.items(), _line_styles(list(runs))):
        fig.add_scatter(x=[r["step"] for r in history], y=[r[y] for r in history],
                        mode="lines+markers", name=name, line=line)
    fig.update_layout(xaxis_title="optimizer step", yaxis_title=y, title=title, **_LAYOUT)
    return fig


def lines_figure(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 x_title: str, y_title: str, title: str | None = None, log_x: bool = False,
                 log_y: bool = False, mode: str = "lines+markers") -> go.Figure:
    """Generic line plot: ``{name: (xs, ys)}``."""
    fig = go.Figure()
    for (name, (xs, ys)), line in zip(series.items(), _line_styles(list(series))):
        fig.add_scatter(x=list(xs), y=_positive_or_none(ys) if log_y else list(ys), mode=mode,
                        name=name, line=line)
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
    palette = OTHER_COLORS
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
    "MEMORY_PARTS", "OTHER_COLORS", "PRECISION_COLORS", "TEMPLATE", "comparison_bars",
    "equivalence_figure", "format_table", "lines_figure", "loss_curves_figure", "memory_figure",
    "partition_figure", "precision_color", "style",
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
