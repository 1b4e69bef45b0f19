"""Mixed precision inside one accumulation window: formats, underflow, loss scaling, 16-bit .grad.

The experiments of notebooks/08_mixed_precision.ipynb, measured against a float64 reference:

- `format_facts`: exponent and mantissa bits, epsilon, range of fp32/bf16/fp16 (torch.finfo);
- `precision_gradient` / `precision_errors`: the gradient a window's micro-batches leave in `.grad`
  under fp32, bf16 autocast, fp16 autocast without and with a GradScaler, its relative error,
  and how many per-token gradient entries (d loss / d logits) underflow to exactly zero;
- `window_scan`: the same for windows of k micro-batches: the loss is divided by the window's
  N, so every micro-batch's gradient shrinks as k (and N) grows;
- `underflow_scan`: the term one micro-batch adds to `.grad` in a window of k alike ones, at
  the cost of one micro-batch (so k can reach real window sizes on a CPU);
- `accumulation_errors`: accumulating in a float32 `.grad` vs a 16-bit one, against k;
- `scaler_cadence`: a fp16 run of `accumlab.Accumulator` with a GradScaler, counting unscale_,
  update, optimizer and scheduler steps per window, including windows skipped on overflow.

Precision names: "fp64", "fp32", "bf16", "fp16" (autocast, no loss scaling) and "fp16+scaler".
Parameters stay float32 under autocast (float64 for "fp64"), as in `accumlab.engine.precision`.
"""

from __future__ import annotations

import copy
import math
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.gradients import gradient_vector, relative_difference
from accumlab.engine.losses import IGNORE_INDEX, aligned_labels, count_items, detect_task
from accumlab.engine.precision import Precision
from accumlab.engine.window import Accumulator, default_forward
from accumlab.lab.equivalence import split_evenly

PRECISIONS = ("fp64", "fp32", "bf16", "fp16", "fp16+scaler")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}
DEFAULT_INIT_SCALE = 2.0**16  # torch.amp.GradScaler's default


def format_facts(names: Sequence[str] = ("fp32", "bf16", "fp16")) -> list[dict]:
    """One record per float format: bits, exponent and mantissa bits, epsilon, largest finite
    value, smallest normal and smallest subnormal number, all read from `torch.finfo`."""
    records = []
    for name in names:
        if name not in DTYPES:
            raise ValueError(f"unknown format {name!r}: choose from {list(DTYPES)}")
        info = torch.finfo(DTYPES[name])
        mantissa = round(-math.log2(info.eps))  # stored fraction bits
        records.append({
            "format": name,
            "bits": info.bits,
            "exponent_bits": info.bits - 1 - mantissa,
            "mantissa_bits": mantissa,
            "eps": info.eps,
            "max": info.max,
            "smallest_normal": info.smallest_normal,
            "smallest_subnormal": smallest_subnormal(DTYPES[name]),
        })
    return records


def smallest_subnormal(dtype: torch.dtype) -> float:
    """The smallest positive number a float dtype holds: smallest normal x epsilon.

    Checked in the dtype itself: it is representable and half of it rounds to zero.
    """
    info = torch.finfo(dtype)
    value = info.smallest_normal * info.eps
    held = torch.tensor(value, dtype=torch.float64).to(dtype)
    if float(held) != value or float(torch.tensor(value / 2, dtype=torch.float64).to(dtype)):
        raise ArithmeticError(f"{dtype} does not have gradual underflow down to {value!r}")
    return value


def underflow_fraction(values: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of the entries that are non-zero in `reference` but exactly zero in `values`."""
    if values.shape != reference.shape:
        raise ValueError(f"shapes differ: values {tuple(values.shape)}, reference "
                         f"{tuple(reference.shape)}")
    nonzero = reference != 0
    total = int(nonzero.sum())
    if total == 0:
        raise ValueError("the reference has no non-zero entry: nothing can underflow")
    return int((nonzero & (values == 0)).sum()) / total


@dataclass
class WindowGradient:
    """What one window left in `.grad`, unscaled, as a float64 vector, and how it got there."""

    vector: torch.Tensor
    precision: str
    window_items: int  # N, the divisor of every micro-batch's summed loss
    grad_dtype: torch.dtype  # dtype of the parameters' .grad
    logits_dtype: torch.dtype  # dtype the model's forward produced
    logit_grad_zeros: int  # entries of d loss / d logits (loss-bearing positions) exactly zero
    logit_grad_entries: int
    loss_scale: float | None  # the GradScaler's scale used (None without one)
    overflow_retries: int  # windows the GradScaler skipped (halving its scale) before this one

    @property
    def logit_underflow(self) -> float:
        """Fraction of the per-token gradient entries that are exactly zero."""
        return self.logit_grad_zeros / max(self.logit_grad_entries, 1)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def precision_gradient(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    precision: str,
    *,
    window_items: int | None = None,
    grad_dtype: torch.dtype | None = None,
    init_scale: float = DEFAULT_INIT_SCALE,
    max_overflows: int = 40,
    task: str | None = None,
    device: str | torch.device = "cpu",
) -> WindowGradient:
    """The gradient `micro_batches` leave in `.grad` as (part of) one accumulation window.

    The model is copied (the caller's is untouched) with float32 parameters, or float64 for
    "fp64". Every micro-batch's summed token loss is divided by `window_items` (N; default:
    the items these micro-batches hold, i.e. they are the whole window), so passing a larger
    N gives the share of one micro-batch in a window of N items. "fp16+scaler" multiplies each
    loss by a `torch.amp.GradScaler`'s scale and unscales once at the end; if the gradients
    overflowed, the scaler halves its scale (what it does by skipping a step in training) and
    the window is run again. `grad_dtype` (e.g. torch.bfloat16) makes autograd accumulate in
    a 16-bit `.grad` instead of float32.
    """
    _check_precision(precision)
    scaled = precision == "fp16+scaler"
    if scaled and grad_dtype not in (None, torch.float32):
        raise ValueError("a GradScaler unscales float32 gradients: use grad_dtype=None with "
                         "'fp16+scaler'")
    device = torch.device(device)
    prec = Precision("fp16" if scaled else precision, device)
    net = copy.deepcopy(model).to(device=device, dtype=prec.param_dtype)
    if grad_dtype is not None:
        _set_grad_dtype(net, grad_dtype)
    task = task or detect_task(model)
    own_items = sum(count_items(b["labels"], task) for b in micro_batches)
    n_items = own_items if window_items is None else int(window_items)
    if n_items < own_items or own_items == 0:
        raise ValueError(f"window_items={window_items} must be at least the {own_items} "
                         "loss-bearing items of the micro-batches (and they must hold some)")
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale) if scaled else None
    holder = torch.optim.SGD(net.parameters(), lr=0.0) if scaled else None  # for unscale_
    overflows, scale = 0, None
    while True:
        net.zero_grad(set_to_none=True)
        zeros, entries, logits_dtype = _run_window(net, micro_batches, prec, task, n_items,
                                                   scaler)
        if scaler is None:
            break
        scale = scaler.get_scale()
        scaler.unscale_(holder)
        if all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None):
            break
        overflows += 1
        if overflows > max_overflows:
            raise FloatingPointError(f"fp16 gradients still overflow after {max_overflows} "
                                     "halvings of the loss scale: check the data and model")
        scaler.update()  # found inf: the scale is halved, as on a skipped step
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    return WindowGradient(
        vector=gradient_vector(net), precision=precision, window_items=n_items,
        grad_dtype=grads[0].dtype, logits_dtype=logits_dtype, logit_grad_zeros=zeros,
        logit_grad_entries=entries, loss_scale=scale, overflow_retries=overflows,
    )


def _set_grad_dtype(net: torch.nn.Module, dtype: torch.dtype) -> None:
    for p in net.parameters():
        if not hasattr(p, "grad_dtype"):
            raise RuntimeError("this torch has no Tensor.grad_dtype (added in torch 2.9): "
                               "upgrade torch to accumulate in a 16-bit .grad")
        p.grad_dtype = dtype


def _run_window(net, micro_batches, prec, task, n_items, scaler):
    """Forward and backward of every micro-batch, loss / N; counts zero logit gradients."""
    acc = Accumulator(net, None, len(micro_batches), task=task, scaler=scaler)
    (window,) = list(acc.windows(micro_batches))
    window.n_items = n_items  # N of the whole window, of which these micro-batches are part
    counts = {"zeros": 0, "entries": 0}
    logits_dtype = None
    for batch in window:
        with prec.autocast():
            logits = default_forward(net, batch)
        logits_dtype = logits.dtype
        logits.register_hook(_zero_counter(batch["labels"], task, counts))
        window.backward(window.loss(logits, batch["labels"]))
    return counts["zeros"], counts["entries"], logits_dtype


def _zero_counter(labels: torch.Tensor, task: str, counts: dict):
    """A hook on the logits: counts exactly-zero gradient entries at loss-bearing positions."""
    def hook(grad):
        g = grad[..., :-1, :] if task == "causal_lm" else grad
        mask = (aligned_labels(labels, task) != IGNORE_INDEX).to(g.device)
        entries = g[mask]
        counts["zeros"] += int((entries == 0).sum())
        counts["entries"] += entries.numel()
    return hook


def precision_errors(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    precisions: Sequence[str] = PRECISIONS[1:],
    *,
    window_items: int | None = None,
    init_scale: float = DEFAULT_INIT_SCALE,
    task: str | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """One record per precision: the window gradient's relative error against float64.

    Each record holds `rel_error` (||g - g64|| / ||g64||), `param_underflow` (fraction of the
    non-zero float64 gradient entries that are exactly zero), `logit_underflow` (fraction of
    per-token gradient entries d loss / d logits that are exactly zero), the dtypes, the loss
    scale and how many overflows the GradScaler met first.
    """
    common = dict(window_items=window_items, task=task, device=device)
    reference = precision_gradient(model, micro_batches, "fp64", **common)
    records = []
    for precision in precisions:
        got = (reference if precision == "fp64" else
               precision_gradient(model, micro_batches, precision, init_scale=init_scale,
                               **common))
        records.append({
            "precision": precision,
            "window_items": got.window_items,
            "rel_error": relative_difference(got.vector, reference.vector),
            "param_underflow": underflow_fraction(got.vector, reference.vector),
            "logit_underflow": got.logit_underflow,
            "grad_dtype": str(got.grad_dtype).replace("torch.", ""),
            "logits_dtype": str(got.logits_dtype).replace("torch.", ""),
            "loss_scale": got.loss_scale,
            "overflow_retries": got.overflow_retries,
        })
    return records


def window_scan(
    model: torch.nn.Module,
    examples: Sequence[dict],
    ks: Sequence[int] = (1, 4, 16),
    micro_batch_size: int = 1,
    precisions: Sequence[str] = PRECISIONS[1:],
    *,
    pad_token_id: int = 0,
    **kwargs,
) -> list[dict]:
    """`precision_errors` of whole windows of k micro-batches of `micro_batch_size` examples
    (the first k x micro_batch_size examples), for each k: N grows with k. Records gain `k`."""
    records = []
    for k in ks:
        needed = k * micro_batch_size
        if needed > len(examples):
            raise ValueError(f"k={k} needs {needed} examples, only {len(examples)} given")
        batches = [pad_collate(chunk, pad_token_id)
                   for chunk in split_evenly(examples[:needed], k)]
        for record in precision_errors(model, batches, precisions, **kwargs):
            records.append({"k": k, **record})
    return records


def underflow_scan(
    model: torch.nn.Module,
    micro_batch: dict,
    window_sizes: Sequence[int] = (1, 16, 256),
    precisions: Sequence[str] = PRECISIONS[1:],
    **kwargs,
) -> list[dict]:
    """`precision_errors` of one micro-batch as one of k alike micro-batches in a window.

    For each k in `window_sizes` the micro-batch's loss is divided by N = k x its own item
    count: the term it adds to `.grad` in a window of k such micro-batches, at the cost of one
    micro-batch. The window's gradient is the sum of k such terms; their lost parts add up
    while their signal parts partly cancel, so the window's relative error is usually larger
    than one term's (compare with `window_scan`). Records gain `k`.
    """
    task = kwargs.get("task") or detect_task(model)
    n = count_items(micro_batch["labels"], task)
    records = []
    for k in window_sizes:
        for record in precision_errors(model, [micro_batch], precisions, window_items=k * n,
                                       **kwargs):
            records.append({"k": k, **record})
    return records


def accumulation_errors(
    model: torch.nn.Module,
    examples: Sequence[dict],
    ks: Sequence[int] = (1, 4, 16),
    *,
    precision: str = "bf16",
    grad_dtypes: Sequence[str] = ("fp32", "bf16"),
    pad_token_id: int = 0,
    task: str | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """A fixed window of `examples` split into k micro-batches, accumulated in a float32 or
    a 16-bit `.grad`: one record per (k, grad dtype) with the relative error against the
    float64 gradient of the whole window as one batch."""
    task = task or detect_task(model)
    whole = [pad_collate(examples, pad_token_id)]
    reference = precision_gradient(model, whole, "fp64", task=task, device=device).vector
    records = []
    for k in ks:
        batches = [pad_collate(chunk, pad_token_id) for chunk in split_evenly(examples, k)]
        for name in grad_dtypes:
            got = precision_gradient(model, batches, precision, grad_dtype=DTYPES[name],
                                  task=task, device=device)
            records.append({"k": k, "grad_dtype": name, "precision": precision,
                            "rel_error": relative_difference(got.vector, reference)})
    return records


def scaler_cadence(
    model: torch.nn.Module,
    micro_batches: Sequence[dict],
    accum_steps: int,
    *,
    init_scale: float = 2.0**20,
    lr: float = 1e-3,
    warmup_steps: int = 4,
    clip_grad_norm: float = 1.0,
    task: str | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train a copy of `model` in fp16 with a GradScaler through `accumlab.Accumulator`.

    An AdamW optimizer and a linear-warmup LambdaLR scheduler; a large `init_scale` makes the
    first windows overflow. Returns ``{"windows": [...], "calls": {...}}``: per window the
    micro-batches run, the scale before and after, whether it stepped, the learning rate used,
    the norm of the still-scaled gradient when `unscale_` was called and the unscaled norm
    that was clipped, and the calls made to unscale_, update, optimizer.step and
    scheduler.step in that window; `calls` are the totals.
    """
    device = torch.device(device)
    task = task or detect_task(model)
    net = copy.deepcopy(model).to(device=device, dtype=torch.float32)
    calls = {"unscale_": 0, "update": 0, "optimizer.step": 0, "scheduler.step": 0,
             "backward": 0}
    seen = {}

    def counted(obj, name, key, before=None):
        original = getattr(obj, name)

        def wrapper(self, *args, **kwargs):
            if before is not None:
                before()
            calls[key] += 1
            return original(*args, **kwargs)
        setattr(obj, name, types.MethodType(wrapper, obj))  # bound, as LR schedulers expect

    def scaled_norm():
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        seen["scaled_norm"] = float(torch.nn.utils.get_total_norm(grads))

    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    counted(optimizer, "step", "optimizer.step")  # before the scheduler wraps it
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps))
    counted(scheduler, "step", "scheduler.step")
    scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
    counted(scaler, "unscale_", "unscale_", before=scaled_norm)
    counted(scaler, "update", "update")
    acc = Accumulator(net, optimizer, accum_steps, task=task, scheduler=scheduler,
                      scaler=scaler, clip_grad_norm=clip_grad_norm)
    prec = Precision("fp16", device)
    windows = []
    for index, window in enumerate(acc.windows(micro_batches)):
        before_calls = dict(calls)
        scale_before = scaler.get_scale()
        for batch in window:
            with prec.autocast():
                logits = default_forward(net, batch)
            window.backward(window.loss(logits, batch["labels"]))
            calls["backward"] += 1
        record = window.step()
        windows.append({
            "window": index + 1,
            "scale_before": scale_before,
            "scale_after": scaler.get_scale(),
            "stepped": record.stepped,
            "lr": record.lr,
            "scaled_grad_norm": seen.pop("scaled_norm", float("nan")),
            "grad_norm": record.grad_norm,
            **{key: calls[key] - before_calls[key] for key in calls},
        })
    return {"windows": windows, "calls": calls}

