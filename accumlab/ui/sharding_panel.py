"""Lesson 13's panel: model size, ranks and k -> memory per rank and bytes sent per window under
DDP and FSDP (arithmetic from `accumlab.lab.sharding_lab.trade_off`; each change is instant)."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from accumlab.lab.sharding_lab import trade_off
from accumlab.ui import viz
from accumlab.ui.panel import Panel, slider

MODEL_SIZES = {"124M (GPT-2 small)": 124e6, "1.5B (GPT-2 XL)": 1.5e9, "7B": 7e9, "13B": 13e9,
               "70B": 70e9}
RANKS = (2, 4, 8, 16, 32, 64, 128, 256)
KS = (1, 2, 4, 8, 16, 32, 64)
COLORS = {"DDP": "#7f7f7f", "FSDP, sync skipped": "#1f77b4",
          "FSDP, sync every micro-batch": "#ff7f0e"}
GB = 1e9


def trade_off_result(size: str, ranks: int, k: int) -> dict:
    """The panel's data: `trade_off` rows for the model size named `size`."""
    return {"size": size, "n_params": MODEL_SIZES[size], "ranks": ranks, "k": k,
            "rows": trade_off(MODEL_SIZES[size], ranks, k)}


def trade_off_figure(result: dict) -> go.Figure:
    """Two bar charts: model-state memory per rank, and bytes each rank sends per window."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "model states per rank (GB, peak in a window)", "sent per rank per window (GB)"))
    for col, key in ((1, "memory"), (2, "sent")):
        for row in result["rows"]:
            fig.add_trace(go.Bar(x=[row["setup"]], y=[row[key] / GB], name=row["setup"],
                                 marker_color=COLORS[row["setup"]], showlegend=col == 1),
                          row=1, col=col)
    fig.update_xaxes(showticklabels=False)
    fig.update_layout(template=viz.TEMPLATE, height=360, barmode="group",
                      title=f"{result['size']}, {result['ranks']} ranks, k = {result['k']} "
                            "(bf16, AdamW)")
    return fig


def _describe(result: dict) -> str:
    ddp, skipped, every = result["rows"]
    return (f"FSDP with the sync skipped holds <b>{skipped['memory'] / GB:,.1f} GB</b> per rank "
            f"at its peak (the whole float32 gradient between micro-batches) and sends "
            f"<b>{skipped['sent'] / GB:,.1f} GB</b> per window; syncing every micro-batch holds "
            f"<b>{every['memory'] / GB:,.1f} GB</b> and sends <b>{every['sent'] / GB:,.1f} "
            f"GB</b>. DDP: {ddp['memory'] / GB:,.1f} GB and {ddp['sent'] / GB:,.1f} GB.")


def trade_off_panel(size: str = "7B", ranks: int = 8, k: int = 8, **kwargs) -> Panel:
    """Model size, ranks R and accumulation steps k -> memory and traffic per rank."""
    controls = {"size": slider("model", tuple(MODEL_SIZES), size),
                "ranks": slider("ranks R", RANKS, ranks),
                "k": slider("accumulation steps k", KS, k)}
    return Panel(controls, trade_off_result, _describe, trade_off_figure, **kwargs)


__all__ = ["MODEL_SIZES", "trade_off_figure", "trade_off_panel", "trade_off_result"]
