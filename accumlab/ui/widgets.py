"""The ipywidgets 8 panels of the notebooks, each a `Panel` (see `accumlab.ui.panel`).

UI only: every panel's callback is a thin call into library functions (`accumlab.lab.memory`,
`accumlab.compare_gradients`, `accumlab.engine.window`), and figures come from `accumlab.ui.viz`. Tests
drive a panel without a browser by setting ``panel.controls["k"].value = 4`` and reading
``panel.result``, ``panel.readout.value`` or ``panel.view.figure``.

Import it explicitly (``from accumlab.ui import widgets``); the core never imports ipywidgets.
Figures are plain plotly figures redrawn inside an `ipywidgets.Output` (small saved notebooks,
and they render on Colab too); ``ACCUMLAB_FIGURES=widget`` makes them FigureWidgets instead
(see `accumlab.ui.panel.figure_mode`).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import torch

from accumlab.engine.models import SIZES
from accumlab.lab import memory
from accumlab.lab.equivalence import GradientComparison, window_report
from accumlab.lab.planner import DEFAULT_HEADROOM, PlanError, plan_training
from accumlab.ui import viz
from accumlab.ui.panel import (
    FIGURE_MODES,
    READOUT_CLASS,
    STATUS_CLASS,
    FigureView,
    LiveLossPlot,
    Panel,
    dropdown,
    figure_mode,
    int_slider,
    sci,
    slider,
)

# ---------------------------------------------------------------- the generic panel


# ---------------------------------------------------------------- 00: planning a split


def plan_panel(target_batch: int = 256, max_micro_batch: int = 12, **kwargs) -> Panel:
    """Effective batch = micro-batch x accumulation steps: `memory.plan_accumulation`."""
    controls = {
        "target_batch": int_slider("target batch", target_batch, 1, 1024),
        "max_micro_batch": int_slider("largest micro-batch that fits", max_micro_batch, 1, 128),
    }

    def describe(plan):
        return (f"micro-batch <b>{plan['micro_batch']}</b> × <b>{plan['accum_steps']}</b> "
                f"accumulation steps = effective batch <b>{plan['effective_batch']}</b>")

    return Panel(controls, memory.plan_accumulation, describe, **kwargs)


# ---------------------------------------------------------------- 01: the memory wall


MEMORY_SIZES = tuple(s for s in ("tiny", "mini", "small", "medium", "gpt2-small") if s in SIZES)
MEMORY_MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128)


def memory_result(size: str, micro_batch: int, seq_len: int, precision: str, attention: str,
                  gpu_gib: float, target_batch: int = 256) -> dict:
    """The memory panel's data: the validated prediction (`memory.predict_memory`, what
    `accumlab plan` uses) for every micro-batch, and the planner's split of `target_batch`
    sequences into micro-batch x accumulation steps on this GPU (`planner.plan_training`)."""
    default = memory.ModelShape.gpt2(size)
    shape = memory.ModelShape.gpt2(size, positions=max(default.positions, seq_len))
    sizes = sorted(set(MEMORY_MICRO_BATCHES) | {micro_batch})
    sweep = [memory.predict_memory(shape, b, seq_len, precision, attention=attention)
             for b in sizes]
    chosen = next(r for r in sweep if r["micro_batch"] == micro_batch)
    try:
        plan, plan_error = plan_training(int(gpu_gib * memory.GIB), shape, seq_len,
                                         target_batch * seq_len, precision,
                                         attention=attention, checkpointing="off"), None
    except PlanError as e:
        plan, plan_error = None, str(e)
    return {"size": size, "shape": shape.to_dict(), "parameters": shape.parameters,
            "sweep": sweep, "chosen": chosen, "gpu_gib": gpu_gib, "plan": plan,
            "plan_error": plan_error, "target_batch": target_batch,
            "fits": memory.fits(chosen["total"], gpu_gib)}


def memory_panel(size: str = "gpt2-small", micro_batch: int = 8, seq_len: int = 1024,
                 precision: str = "bf16", attention: str = "sdpa", gpu_gib: float = 80,
                 target_batch: int = 256, **kwargs) -> Panel:
    """Model size, micro-batch, sequence length, precision, attention and GPU -> the
    predicted peak of one training step (`memory.predict_memory`, validated against measured
    peaks) and the planner's micro-batch x accumulation steps for `target_batch` sequences."""
    controls = {
        "size": dropdown("model", MEMORY_SIZES, size),
        "micro_batch": slider("micro-batch", MEMORY_MICRO_BATCHES, micro_batch),
        "seq_len": slider("sequence length", (128, 256, 512, 1024, 2048, 4096), seq_len),
        "precision": dropdown("precision", ("bf16", "fp16", "fp32", "fp64"), precision),
        "attention": dropdown("attention", ("sdpa", "eager"), attention),
        "gpu_gib": dropdown("GPU memory (GiB)", (8, 16, 24, 40, 80, 141), gpu_gib),
    }

    def compute(**values):
        return memory_result(target_batch=target_batch, **values)

    def describe(r):
        c = r["chosen"]
        g = memory.gib
        states = c["weights"] + c["gradients"] + c["optimizer"] + c["weight_copies"]
        verdict = ("fits" if r["fits"] else "<b style='color:#b00'>does not fit</b>")
        if r["plan"] is not None:
            p = r["plan"]
            plan = (f"For {r['target_batch']} sequences per optimizer step the planner "
                    f"chooses micro-batch <b>{p.micro_batch}</b> × <b>{p.accum_steps}</b> "
                    f"accumulation steps (predicted {g(p.predicted['total']):.1f} GiB, keeping "
                    f"{DEFAULT_HEADROOM:.0%} of the GPU free).")
        else:
            plan = f"Planner: {html.escape(r['plan_error'])}"
        return (f"{r['size']} ({r['parameters'] / 1e6:.1f}M parameters), micro-batch "
                f"{c['micro_batch']} × {c['seq_len']} tokens, {c['precision']}: predicted peak "
                f"<b>{g(c['total']):.1f} GiB</b> (model states {g(states):.2f}, activations "
                f"{g(c['activations']):.2f}, logits {g(c['logits']):.2f} GiB; the peak is in "
                f"the {c['phase']}); {verdict} in {r['gpu_gib']:g} GiB. {plan}")

    def render(r):
        return viz.memory_figure(r["sweep"], highlight=r["chosen"]["micro_batch"],
                                 budget_gib=r["gpu_gib"],
                                 title="predicted peak of one training step")

    return Panel(controls, compute, describe, render, **kwargs)


# ---------------------------------------------------------------- 02: partitions and windows


def partition_panel(model: torch.nn.Module, examples: Sequence[dict], task: str | None = None,
                    pad_token_id: int = 0, micro_batch_size: int = 2, accum_steps: int = 2,
                    normalization: str = "tokens", **kwargs) -> Panel:
    """Partition examples into micro-batches and windows; watch each window's gradient."""
    n = len(examples)
    controls = {
        "micro_batch_size": slider("micro-batch size", range(1, n + 1), micro_batch_size),
        "accum_steps": slider("accumulation steps k", range(1, n + 1), accum_steps),
        "normalization": dropdown("normalisation", ("tokens", "samples", "mean_of_means"),
                                   normalization),
        "partial_window": dropdown("partial last window", ("step", "drop"), "step"),
    }

    seen: dict[tuple, list[dict]] = {}  # settings already computed answer at once

    def compute(micro_batch_size, accum_steps, normalization, partial_window):
        import warnings

        key = (micro_batch_size, accum_steps, normalization, partial_window)
        if key not in seen:
            with warnings.catch_warnings():  # the readout says it; no warning spam in the panel
                warnings.simplefilter("ignore")
                seen[key] = window_report(model, examples, micro_batch_size, accum_steps,
                                          normalization, partial_window, task=task,
                                          pad_token_id=pad_token_id)
        return seen[key]

    def describe(windows):
        steps = sum(w["stepped"] for w in windows)
        worst = max(w["rel_diff"] for w in windows)
        parts = [f"{len(windows)} window(s), <b>{steps}</b> optimizer step(s)"]
        if windows[-1]["partial"]:
            parts.append(f"the last window is partial ({len(windows[-1]['items'])} "
                         f"micro-batch(es)) and is "
                         + ("stepped with its own item count" if windows[-1]["stepped"]
                            else "dropped"))
        parts.append(f"largest relative difference from one batch of the same examples: "
                     f"<b>{sci(worst)}</b>")
        return "; ".join(parts)

    return Panel(controls, compute, describe, lambda w: viz.partition_figure(w), **kwargs)


# ---------------------------------------------------------------- 03: equivalence


def equivalence_panel(model: torch.nn.Module,
                      examples: Sequence[dict] | Callable[[int, int], Sequence[dict]],
                      ks: Sequence[int] = (1, 2, 4, 8, 16, 32),
                      precisions: Sequence[str] = ("fp64", "fp32", "bf16", "fp16"),
                      k: int | None = None, precision: str | None = None,
                      device: str = "cpu", task: str | None = None,
                      normalization: str = "tokens", pad_token_id: int | None = None,
                      seq_lens: Sequence[int] = (), sizes: Sequence[int] = (),
                      seq_len: int | None = None, n_examples: int | None = None,
                      comparison: GradientComparison | None = None,
                      reference_micro_batch_size: int | None = None, **kwargs) -> Panel:
    """Pick k and a precision: accumulated vs single-batch gradient, each against fp64.

    When `examples` is a function ``(seq_len, n_examples) -> examples``, two more sliders pick
    the sequence length (`seq_lens`) and the number of examples (`sizes`). Each set of
    examples gets one `GradientComparison`, so its float64 reference and single-batch
    gradients are computed once; `comparison` is the one of the starting examples (a lesson
    passes the one that made its table); `reference_micro_batch_size` is passed on to the new
    ones (a float64 reference in micro-batches: the same gradient to about 1e-16, less memory).
    The status line counts the gradients being computed.
    """
    make = examples if callable(examples) else None
    if make is not None:
        seq_len = seq_len if seq_len is not None else seq_lens[0]
        n_examples = n_examples if n_examples is not None else sizes[-1]
        start = (seq_len, n_examples)
    else:
        start = (None, len(examples))
        ks = [k_ for k_ in ks if k_ <= len(examples)]
    controls = {}
    if make is not None:
        controls["seq_len"] = slider("sequence length s (tokens)", seq_lens, seq_len)
        controls["n_examples"] = slider("sequences in the batch", sizes, n_examples)
    controls["k"] = slider("accumulation steps k", ks,
                           k if k is not None else ks[min(2, len(ks) - 1)])
    controls["precision"] = dropdown("precision", precisions,
                                     precision if precision is not None else precisions[0])
    comparisons = {start: comparison} if comparison is not None else {}
    panel = None

    def progress(message):
        if "fp16" in message and torch.device(device).type == "cpu":
            message += " (fp16 is slow on a CPU: it has no fast fp16 matrix kernels)"
        panel.status.value = f"<i>running… {html.escape(message)}</i>"

    def compute(k, precision, seq_len=None, n_examples=None):
        key = (seq_len, n_examples) if make is not None else start
        if key not in comparisons:
            data = make(*key) if make is not None else examples
            comparisons[key] = GradientComparison(
                model, data, task=task, normalization=normalization, pad_token_id=pad_token_id,
                device=device, reference_micro_batch_size=reference_micro_batch_size)
            kept = [other for other in comparisons if other != start or comparison is None]
            if len(kept) > 3:  # the gradients of the last few settings only (and the table's)
                comparisons.pop(kept[0])
        comparisons[key] = comparisons.pop(key)  # most recently used last
        comp = comparisons[key]
        record = comp.record(precision, k, progress=progress)
        return {**record, "seq_len": seq_len, "items": comp.items}

    def describe(r):
        if r["single_vs_fp64"] == 0:
            verdict = "fp64 is the reference itself: what remains is float64 rounding."
        else:
            verdict = (f"Accumulation's own error is {r['vs_single'] / r['single_vs_fp64']:.2f}× "
                       f"the precision's.")
        size = (f"{r['examples']} sequences of at most {r['seq_len']} tokens "
                if r["seq_len"] is not None else f"{r['examples']} examples ")
        return (f"{size}(N = {r['items']} loss items), k = {r['k']}, {r['precision']}: "
                f"accumulated vs single batch <b>{sci(r['vs_single'])}</b>; single batch vs "
                f"fp64 <b>{sci(r['single_vs_fp64'])}</b>; accumulated vs fp64 "
                f"{sci(r['vs_fp64'])}. {verdict}")

    def render(r):
        p = r["precision"]
        size = f"s = {r['seq_len']}, " if r["seq_len"] is not None else ""
        return viz.comparison_bars(
            {f"{p}: accumulated vs single": r["vs_single"],
             f"{p}: single vs fp64": r["single_vs_fp64"],
             f"{p}: accumulated vs fp64": r["vs_fp64"]},
            title=f"{size}{r['examples']} examples, k = {r['k']}, {p}", log=False)

    run = kwargs.pop("run", True)
    panel = Panel(controls, compute, describe, render, run=False, **kwargs)
    if run:
        panel.refresh()
    return panel


__all__ = [
    "FIGURE_MODES", "READOUT_CLASS", "STATUS_CLASS",
    "FigureView", "LiveLossPlot", "Panel", "equivalence_panel", "figure_mode", "memory_panel",
    "memory_result", "partition_panel", "plan_panel", "window_report",
]


# ---------------------------------------------------------------- 07: long sequences

LONG_SEQ_LENS = (256, 512, 1024, 2048, 4096, 8192)
PLAN_MODELS = ("gpt2-small", "gpt2-medium", "tinyllama-1.1b", "llama-3.2-1b")


def long_sequence_result(model: str, gpu: str, seq_len: int, checkpointing: str,
                         attention: str, loss_chunk_size, global_batch_tokens: int) -> dict:
    """The long-sequence panel's data: the plan for this length (or why nothing fits) and
    the predicted peak of micro-batch 1 at every length (`accumlab.lab.planner`, `memory`)."""
    from accumlab.lab.planner import PlanError, parse_bytes, plan_training

    named = memory.ModelShape.named(model)
    shape = memory.ModelShape(**{**named.to_dict(),
                                 "positions": max(named.positions, max(LONG_SEQ_LENS))})
    chunk = None if loss_chunk_size == "none" else int(loss_chunk_size)
    sweep = [memory.predict_memory(shape, 1, s, "bf16", attention=attention,
                                   checkpointing=checkpointing == "on", loss_chunk_size=chunk)
             for s in LONG_SEQ_LENS]
    try:
        plan, error = plan_training(gpu, shape, seq_len, global_batch_tokens, "bf16",
                                    attention=attention, checkpointing=checkpointing,
                                    loss_chunk_size=chunk), None
    except PlanError as e:
        plan, error = None, str(e)
    return {"model": model, "seq_len": seq_len, "sweep": sweep, "plan": plan, "error": error,
            "gpu_gib": parse_bytes(gpu) / memory.GIB}


def long_sequence_panel(model: str = "gpt2-small", gpu: str = "24GB", seq_len: int = 1024,
                        checkpointing: str = "auto", attention: str = "sdpa",
                        loss_chunk_size="none", global_batch_tokens: int = 2**19,
                        **kwargs) -> Panel:
    """Sequence length, checkpointing, attention and loss chunks -> the planner's split and
    the predicted peak of one sequence per micro-batch at every length."""
    controls = {
        "model": dropdown("model", PLAN_MODELS, model),
        "gpu": dropdown("GPU", ("12GB", "16GB", "24GB", "40GB", "80GB"), gpu),
        "seq_len": slider("sequence length", LONG_SEQ_LENS, seq_len),
        "checkpointing": dropdown("checkpointing", ("auto", "on", "off"), checkpointing),
        "attention": dropdown("attention", ("sdpa", "eager"), attention),
        "loss_chunk_size": dropdown("loss chunk (positions)", ("none", "1024", "8192"),
                                     loss_chunk_size),
    }

    def compute(**values):
        return long_sequence_result(global_batch_tokens=global_batch_tokens, **values)

    def describe(r):
        if r["plan"] is None:
            return f"<b style='color:#b00'>nothing fits</b>: {html.escape(r['error'])}"
        p = r["plan"]
        ck = " with activation checkpointing" if p.checkpointing else ""
        return (f"{r['model']}, {r['seq_len']} tokens per sequence: micro-batch "
                f"<b>{p.micro_batch}</b> × <b>{p.accum_steps}</b> accumulation steps{ck}, "
                f"predicted peak <b>{memory.gib(p.predicted['total']):.1f} GiB</b> of "
                f"{r['gpu_gib']:.1f} GiB; {p.tokens_per_step:,} tokens per optimizer step")

    def render(r):
        highlight = r["seq_len"]
        return viz.memory_by_length_figure(r["sweep"], highlight=highlight,
                                           budget_gib=r["gpu_gib"],
                                           title="predicted peak, one sequence per micro-batch")

    return Panel(controls, compute, describe, render, **kwargs)


__all__ += ["long_sequence_panel", "long_sequence_result"]
