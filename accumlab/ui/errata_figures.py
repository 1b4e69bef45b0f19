"""Plotly figures of lesson 12 (seed errata), from `accumlab.lab.errata` records.

Like `accumlab.ui.viz`, every builder returns a `plotly.graph_objects.Figure` whose traces carry
the numbers they were given (``fig.data[i].y``), so tests read numbers, not pixels.
"""

from __future__ import annotations

from collections.abc import Mapping

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from accumlab.ui.viz import TEMPLATE

_LAYOUT = dict(template=TEMPLATE, height=420)
ACCUMULATED, ONE_BATCH, PREDICTED = "#1f77b4", "#ff7f0e", "black"


def gradient_law_figure(distribution: Mapping, title: str | None = None) -> go.Figure:
    """Two log-log panels against B = b·k, from `errata.gradient_distribution`: the total
    variance tr Cov(G_B) and the mean square norm E|G_B|², each measured for windows of k
    micro-batches (accumulated) and for single batches of B, with the predictions tr Σ / B and
    |G|² + tr Σ / B, and the floor |G|² that no batch size goes below."""
    rows = distribution["rows"]
    truth = distribution["truth"]
    xs = [r["B"] for r in rows]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "spread: tr Cov(G_B)", "size: E|G_B|² = |G|² + tr Σ / B"))
    for col, key in ((1, "variance"), (2, "mean_sq")):
        show = col == 1
        fig.add_scatter(x=xs, y=[r[f"{key} accumulated"] for r in rows], mode="markers",
                        name=f"k micro-batches of b={rows[0]['b']} (accumulated)",
                        marker=dict(color=ACCUMULATED, size=10), legendgroup="acc",
                        showlegend=show, row=1, col=col)
        fig.add_scatter(x=xs, y=[r[f"{key} one batch"] for r in rows], mode="markers",
                        name="one batch of B", legendgroup="one", showlegend=show,
                        marker=dict(color=ONE_BATCH, size=10, symbol="x"), row=1, col=col)
        fig.add_scatter(x=xs, y=[r[f"{key} predicted"] for r in rows], mode="lines",
                        name="predicted from per-example gradients", legendgroup="pred",
                        showlegend=show, line=dict(color=PREDICTED), row=1, col=col)
    fig.add_scatter(x=[xs[0], xs[-1]], y=[truth["grad_sq"]] * 2, mode="lines",
                    name="|G|²: the floor", line=dict(color="gray", dash="dash"), row=1, col=2)
    fig.update_xaxes(type="log", title_text="items per update B = b·k")
    fig.update_yaxes(type="log", exponentformat="power")
    fig.update_layout(title=title, **_LAYOUT)
    return fig


def projection_histogram(distribution: Mapping, k: int, title: str | None = None) -> go.Figure:
    """Histograms of the window gradient's component along the true gradient's direction, for
    windows of k micro-batches and for single batches of b·k (from `gradient_distribution`),
    with the true component |G| marked."""
    pair = distribution["samples"][k]
    truth = distribution["truth"]
    fig = go.Figure()
    for name, color in (("accumulated", ACCUMULATED), ("one batch", ONE_BATCH)):
        s = pair[name]
        label = (f"{s['accum_steps']} micro-batches of {s['micro_batch']}" if name == "accumulated"
                 else f"one batch of {s['micro_batch']}")
        fig.add_histogram(x=s["along"], name=label, opacity=0.55, marker_color=color,
                          histnorm="probability density", nbinsx=30)
    fig.add_vline(x=truth["grad_sq"] ** 0.5, line_color=PREDICTED, line_dash="dash",
                  annotation_text="|G|", annotation_position="top right")
    fig.update_layout(barmode="overlay", xaxis_title="component of G_B along G / |G|",
                      yaxis_title="density", title=title, **_LAYOUT)
    return fig


__all__ = ["gradient_law_figure", "projection_histogram"]
