"""Panels of lessons 06–11 (each a `Panel`, see `accumlab.ui.panel`): thin calls into
`accumlab.lab`, figures from `accumlab.ui.viz`.

Tests drive a panel without a browser by setting ``panel.controls["batch"].value = 16`` and
reading ``panel.result``, ``panel.readout.value`` or ``panel.view.figure``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence

import ipywidgets as W

from accumlab.lab import large_batch
from accumlab.ui import viz
from accumlab.ui.panel import Panel, dropdown, slider

# ---------------------------------------------------------------- 06: batch size and LR rule


class _TrainingStatus:
    """A training callback that writes the step and held-out loss into a panel's status line,
    so that a pick that has to train says what it is doing."""

    def __init__(self, status: W.HTML, what: str):
        self.status, self.what = status, what

    def on_step_end(self, entry: dict) -> None:
        held_out = f", held-out loss {entry['eval']['loss']:.2f}" if "eval" in entry else ""
        self.status.value = (f"<i>training {html.escape(self.what)} (not run above, so a fresh "
                             f"model trains now, a few seconds): step {entry['step']}"
                             f"{held_out}…</i>")


def batch_picker_panel(train_run: Callable[..., dict], batches: Sequence[int],
                       rules: Sequence[str], runs: Mapping[tuple[int, str], dict] | None = None,
                       batch: int | None = None, rule: str = "sqrt", target_loss: float | None = None,
                       **kwargs) -> Panel:
    """Pick a batch size and a learning-rate rule: steps and tokens to the target, the live
    noise scale at the end, and the regime the batch is in against it.

    `train_run(batch, rule, callbacks=...)` trains one run (`large_batch.rule_run` with the
    lesson's data and settings); `runs` holds runs already made, keyed by (batch, rule): those
    answer at once, any other pick trains and shows its progress in the status line. Every
    run made is kept, so a second visit answers at once.
    """
    cache = dict(runs or {})
    holder: dict[str, Panel] = {}
    controls = {
        "batch": slider("batch (sequences)", batches, batch if batch is not None else batches[0]),
        "rule": dropdown("learning-rate rule", rules, rule),
    }

    def compute(batch, rule):
        if (batch, rule) not in cache:
            status = _TrainingStatus(holder["panel"].status, f"batch {batch} with the {rule} rule")
            cache[(batch, rule)] = train_run(batch, rule, callbacks=[status])
        return {"run": cache[(batch, rule)], "rule": rule,
                **large_batch.run_regime(cache[(batch, rule)]),
                "others": {b: r for (b, x), r in cache.items() if x == rule and b != batch}}

    def describe(r):
        run = r["run"]
        reached = (f"reached the target in <b>{run['steps']:.1f}</b> optimizer steps and "
                   f"<b>{run['tokens']:,.0f}</b> training tokens" if run["reached"] else
                   "<b style='color:#b00'>did not reach the target</b> within its steps")
        noise = run["noise_scale_tokens"]
        where = ("the live noise scale was not estimable" if not math.isfinite(r["ratio"]) else
                 f"live noise scale at the end <b>{noise:,.0f}</b> tokens, batch "
                 f"{r['batch_tokens']:,.0f} tokens = <b>{r['ratio']:.1f}</b> × B_noise: "
                 f"<b>{r['regime']}</b>")
        return (f"batch {run['batch']} = {run['micro_batch_size']} × {run['accum_steps']} "
                f"micro-batches, η = {run['lr']:.2e} ({html.escape(r['rule'])} rule): {reached}; "
                f"{where}")

    def render(r):
        series = {f"batch {b}": ([s for s, _ in o["evals"]], [v for _, v in o["evals"]])
                  for b, o in sorted(r["others"].items())}
        run = r["run"]
        series[f"batch {run['batch']} (picked)"] = ([s for s, _ in run["evals"]],
                                                    [v for _, v in run["evals"]])
        fig = viz.lines_figure(series, x_title="optimizer step", y_title="held-out loss",
                               title=f"held-out loss, {r['rule']} rule")
        for trace in fig.data[:-1]:
            trace.update(opacity=0.35, line_width=1)
        fig.data[-1].update(line_width=3)
        if target_loss is not None:
            fig.add_hline(y=target_loss, line_dash="dash", line_color="black",
                          annotation_text="target", annotation_position="top right")
        return fig

    panel = Panel(controls, compute, describe, render, run=False, **kwargs)
    holder["panel"] = panel
    panel.refresh()
    return panel


__all__ = ["batch_picker_panel"]
