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
import plotly.graph_objects as go
import torch

from accumlab.lab import large_batch, underflow
from accumlab.ui import viz
from accumlab.ui.panel import Panel, dropdown, slider

# ---------------------------------------------------------------- 06: batch size and LR rule


class _TrainingStatus:
    """A training callback that writes the step and held-out loss into a panel's status line,
    so that a change that has to train says what it is doing and why it takes a while."""

    def __init__(self, status: W.HTML, what: str,
                 why: str = "not run above, so a fresh model trains now, a few seconds"):
        self.status, self.what, self.why = status, what, why
        self.total: int | None = None

    def on_train_begin(self, info: dict) -> None:
        self.total = info.get("total_steps")

    def on_step_end(self, entry: dict) -> None:
        held_out = f", held-out loss {entry['eval']['loss']:.2f}" if "eval" in entry else ""
        of = f" of {self.total}" if self.total else ""
        self.status.value = (f"<i>training {html.escape(self.what)} ({html.escape(self.why)}): "
                             f"step {entry['step']}{of}{held_out}…</i>")


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


# ---------------------------------------------------------------- 11: fine-tuning settings


def finetune_panel(train_run: Callable[..., dict], micro: int = 32, k: int = 2,
                   lr: float = 2e-3, micro_options: Sequence[int] = (4, 8, 16, 32, 64),
                   k_options: Sequence[int] = (1, 2, 4, 8),
                   lr_options: Sequence[float] = (5e-4, 1e-3, 2e-3, 4e-3), **kwargs) -> Panel:
    """Micro-batch b, accumulation steps k and learning rate -> a short fine-tuning run.

    `train_run(micro, k, lr, callbacks=...)` returns `accumlab.lab.finetune.finetune`'s result;
    every change trains a fresh model, so the status line shows the run's progress.
    """
    holder: dict[str, Panel] = {}
    controls = {"micro": dropdown("micro-batch b", micro_options, micro),
                "k": dropdown("accumulation steps k", k_options, k),
                "lr": dropdown("learning rate η", lr_options, lr)}

    def compute(micro, k, lr):
        status = _TrainingStatus(holder["panel"].status, f"b = {micro} × k = {k}, η = {lr:g}",
                                 "every change fine-tunes a fresh model, a few seconds")
        run = train_run(micro, k, lr, callbacks=[status])
        return {"micro": micro, "k": k, "lr": lr, "steps": run["steps"],
                "history": run["result"].history, "dev": run["best"]}

    def describe(r):
        return (f"effective batch b × k = <b>{r['micro'] * r['k']}</b>, {r['steps']} optimizer "
                f"steps; dev accuracy <b>{r['dev']['accuracy']:.3f}</b>, "
                f"F1 {r['dev']['f1']:.3f}")

    def render(r):
        return viz.loss_curves_figure({f"{r['micro']} x {r['k']}": r["history"]},
                                      title="training loss")

    panel = Panel(controls, compute, describe, render, run=False, **kwargs)
    holder["panel"] = panel
    panel.refresh()
    return panel


# ---------------------------------------------------------------- 08: fp16 underflow explorer

VOCABULARIES = (4096, 32000, 50257, 128256)  # this course's, Llama 2's, GPT-2's, Llama 3's
WINDOW_TOKENS = (128, 1024, 8192, 65536, 524288)
PROBABILITIES = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
LOSS_SCALES = {"none (1)": 1.0, "2^8": 2.0**8, "2^16 (torch's default)": 2.0**16,
               "2^24": 2.0**24}


def underflow_result(vocab: int, n_tokens: int, p: float, scale: str,
                     shares: underflow.ZeroShares | None = None) -> dict:
    """The explorer's data: the term p / N under the loss scale, the uniform share 1 / V as
    a second term, and (given real probabilities) the share of entries that become 0."""
    s = LOSS_SCALES[scale]
    return {"term": underflow.fp16_term(p, n_tokens, s),
            "uniform": underflow.fp16_term(1.0 / vocab, n_tokens, s), "vocab": vocab,
            "zero_share": None if shares is None else shares(n_tokens, s),
            "unscaled_zero_share": None if shares is None else shares(n_tokens)}


def _fp16_line(r: dict) -> go.Figure:
    """fp16's number line (log scale): zero, subnormal and normal ranges, and the terms."""
    lo, hi = 1e-12, 1e6
    regions = (("rounds to 0", lo, underflow.SMALLEST_SUBNORMAL / 2, "#f4c7c3"),
               ("subnormal", underflow.SMALLEST_SUBNORMAL / 2, underflow.FP16.smallest_normal,
                "#fce8b2"),
               ("normal", underflow.FP16.smallest_normal, underflow.FP16.max, "#d9ead3"),
               ("inf", underflow.FP16.max, hi, "#f4c7c3"))
    shapes = [dict(type="rect", xref="x", yref="paper", x0=x0, x1=x1, y0=0, y1=1,
                   fillcolor=color, line_width=0, layer="below")
              for _, x0, x1, color in regions]
    labels = [dict(x=math.log10(x0), y=1, xref="x", yref="paper", text=name, showarrow=False,
                   xanchor="left", yanchor="top") for name, x0, _, _ in regions]
    term, uniform = r["term"], r["uniform"]
    points = (("p / N (exact)", term["exact"], "circle-open"),
              ("S · p / N (what fp16 holds)", term["scaled"], "circle"),
              (f"S / (V N), V = {r['vocab']:,}", uniform["scaled"], "diamond"))
    data = [go.Scatter(x=[min(max(x, lo), hi)], y=[0], mode="markers", name=name,
                       marker=dict(size=14, symbol=symbol)) for name, x, symbol in points]
    return go.Figure(data=data, layout=dict(
        shapes=shapes, annotations=labels, template=viz.TEMPLATE, height=260,
        title="where the gradient term lands in fp16", yaxis=dict(visible=False, range=[-1, 1]),
        xaxis=dict(type="log", range=[-12, 6], exponentformat="power", title="value")))


def underflow_panel(vocab: int = 50257, n_tokens: int = 8192, p: float = 1e-5,
                    scale: str = "none (1)", probs: torch.Tensor | None = None,
                    **kwargs) -> Panel:
    """Vocabulary V, window tokens N, a wrong token's probability p and the loss scale S ->
    what fp16 stores for the logit's gradient term S·p/N, and whether it underflows.
    `probs` (real next-token probabilities) adds the share of their terms that become 0."""
    controls = {
        "vocab": dropdown("vocabulary V", VOCABULARIES, vocab),
        "n_tokens": slider("window tokens N", WINDOW_TOKENS, n_tokens),
        "p": slider("probability p", PROBABILITIES, p),
        "scale": dropdown("loss scale S", tuple(LOSS_SCALES), scale),
    }

    shares = None if probs is None else underflow.ZeroShares(probs)  # sorted once

    def compute(vocab, n_tokens, p, scale):
        return underflow_result(vocab, n_tokens, p, scale, shares)

    def describe(r):
        t, u = r["term"], r["uniform"]
        verdict = {"zero": "<b style='color:#b00'>rounds to 0</b>: the gradient is lost",
                   "subnormal": "<b style='color:#a60'>subnormal</b>: stored with few bits",
                   "normal": "<b>normal</b>: stored with fp16's full 11 significant bits",
                   "overflow": "<b style='color:#b00'>overflows to inf</b>: the scaler "
                               "would skip this step and halve S"}[t["status"]]
        text = (f"p / N = {t['exact']:.2e}; scaled by S = {t['loss_scale']:g}: "
                f"{t['scaled']:.2e} → fp16 stores {t['stored']:.4g}, {verdict}; after "
                f"unscaling, relative error {t['rel_error']:.1%}. The uniform share 1 / V = "
                f"{1 / r['vocab']:.1e} gives a term {u['scaled']:.2e}: {u['status']}.")
        if r["zero_share"] is not None:
            text += (f" Of this lesson's real probabilities (section 1), "
                     f"<b>{r['zero_share']:.1%}</b> give a zero term at this N and S "
                     f"({r['unscaled_zero_share']:.1%} without scaling).")
        return text

    return Panel(controls, compute, describe, _fp16_line, **kwargs)


__all__ = ["batch_picker_panel", "finetune_panel", "underflow_panel", "underflow_result"]
