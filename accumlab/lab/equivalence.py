"""Accumulated vs single-batch gradients, measured against a float64 reference."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

from accumlab.engine.batching import micro_batches
from accumlab.engine.collate import pad_collate
from accumlab.engine.gradients import gradient_vector, relative_difference
from accumlab.engine.losses import count_items, detect_task
from accumlab.engine.precision import Precision
from accumlab.engine.window import Accumulator, accumulate_gradients, default_forward

# Measured on one H100 outside the notebooks; lesson 03 quotes it on a CPU, labelled as such,
# and measures its own table on a GPU. What is known of the run is in the source file.
REFERENCE_H100 = {
    "source": "benchmarks/results/equivalence_h100.txt",
    "setting": "one H100 80GB, GPT-2 small (124M parameters, V = 50257), 32 sequences x 256 "
               "tokens",
    "rows": (  # accumulated vs single batch, single batch vs float64
        {"precision": "fp32 (TF32 off)", "vs_single": 2.4e-6, "single_vs_fp64": 2.55e-6},
        {"precision": "TF32", "vs_single": 4.4e-4, "single_vs_fp64": 9e-4},
        {"precision": "bf16 autocast", "vs_single": 5.3e-3, "single_vs_fp64": 9.7e-3},
    ),
    "fp16_no_scaling_single_vs_fp64": 0.26,
}


def with_ratio(records: Sequence[dict]) -> list[dict]:
    """Records with `ratio` = vs_single / single_vs_fp64: accumulation's error in units of the
    precision's own (None where the precision is the float64 reference itself)."""
    return [{**r, "ratio": r["vs_single"] / r["single_vs_fp64"] if r["single_vs_fp64"] else None}
            for r in records]


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """Split a sequence into `parts` contiguous chunks whose sizes differ by at most one."""
    if not 1 <= parts <= len(items):
        raise ValueError(f"cannot split {len(items)} examples into {parts} micro-batches")
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def window_gradient(
    model: torch.nn.Module, examples: Sequence[dict], k: int, *, task: str,
    precision: str = "fp64", normalization: str = "tokens", pad_token_id: int = 0,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Gradient of one window of `examples` split into k padded micro-batches, as a vector.

    The model is copied and cast to the precision's parameter dtype, so the caller's model is
    left untouched. bf16/fp16 run under autocast (fp16 without loss scaling).
    """
    prec = Precision(precision, torch.device(device))
    net = copy.deepcopy(model).to(device=device, dtype=prec.param_dtype)
    net.zero_grad(set_to_none=True)
    batches = [pad_collate(chunk, pad_token_id) for chunk in split_evenly(examples, k)]

    def forward(m, batch):
        with prec.autocast():
            return default_forward(m, batch)

    accumulate_gradients(net, batches, task=task, normalization=normalization, forward=forward)
    return gradient_vector(net)


class GradientComparison:
    """Accumulated vs single-batch gradients of one set of examples, one (precision, k) at a time.

    The float64 single-batch reference and each precision's single-batch gradient are computed
    once and kept, so after the first record a new k costs one window gradient and a new
    precision two. `record` returns what `compare_gradients` returns for that pair; `records`
    keeps every record made so far by (precision, k). Call `forget(precision)` to free a kept
    single-batch gradient. `items` is N, the loss-bearing items (tokens or examples) of the batch.

    With `reference_micro_batch_size` the float64 reference is accumulated over micro-batches of
    at most that many examples: in float64 that equals the one-batch gradient to about 1e-16
    (contract point 1) and needs a fraction of the memory. By default it is one batch, as in
    `compare_gradients`.
    """

    def __init__(self, model: torch.nn.Module, examples: Sequence[dict], *,
                 task: str | None = None, normalization: str = "tokens",
                 pad_token_id: int | None = None, device: str | torch.device = "cpu",
                 reference_micro_batch_size: int | None = None):
        self.model = model
        self.examples = list(examples)
        task = task or detect_task(model)
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
        self._common = dict(task=task, normalization=normalization, pad_token_id=pad_token_id,
                            device=device)
        self.items = count_items(pad_collate(self.examples, pad_token_id)["labels"], task)
        size = reference_micro_batch_size or len(self.examples)
        self._reference_k = -(-len(self.examples) // size)  # micro-batches of the reference
        self._reference: torch.Tensor | None = None
        self._singles: dict[str, tuple[torch.Tensor, float]] = {}  # gradient, error vs fp64
        self.records: dict[tuple[str, int], dict] = {}

    def pending(self, precision: str, k: int) -> int:
        """How many window gradients `record(precision, k)` still has to compute (0 to 3)."""
        if (precision, k) in self.records:
            return 0
        return 1 + (self._reference is None) + (precision not in self._singles)

    def record(self, precision: str, k: int,
               progress: Callable[[str], None] | None = None) -> dict:
        """The record of k accumulated micro-batches in `precision` (see `compare_gradients`);
        `progress(message)` is called before each gradient that has to be computed."""
        if (precision, k) in self.records:
            return self.records[(precision, k)]
        todo, done = self.pending(precision, k), 0

        def gradient(what, micro_batches, prec):
            nonlocal done
            done += 1
            if progress is not None:
                progress(f"gradient {done} of {todo}: {what}")
            return window_gradient(self.model, self.examples, micro_batches, precision=prec,
                                   **self._common)

        if self._reference is None:
            what = ("the float64 single batch (the reference)" if self._reference_k == 1 else
                    f"the float64 reference ({self._reference_k} micro-batches)")
            self._reference = gradient(what, self._reference_k, "fp64")
        if precision not in self._singles:
            single = gradient(f"the single batch in {precision}", 1, precision)
            self._singles[precision] = single, relative_difference(single, self._reference)
        single, single_error = self._singles[precision]
        accumulated = gradient(f"{k} accumulated micro-batches in {precision}", k, precision)
        record = {
            "precision": precision,
            "k": k,
            "examples": len(self.examples),
            "vs_single": relative_difference(accumulated, single),
            "vs_fp64": relative_difference(accumulated, self._reference),
            "single_vs_fp64": single_error,
        }
        self.records[(precision, k)] = record
        return record

    def forget(self, precision: str) -> None:
        """Free the kept single-batch gradient of `precision` (its records stay)."""
        self._singles.pop(precision, None)


def compare_gradients(
    model: torch.nn.Module,
    examples: Sequence[dict],
    ks: Sequence[int] = (1, 2, 4, 8),
    precisions: Sequence[str] = ("fp64", "fp32"),
    *,
    task: str | None = None,
    normalization: str = "tokens",
    pad_token_id: int | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """One record per (precision, k): how far k accumulated micro-batches are from one batch.

    Each record holds `vs_single` (accumulated vs the single batch in the same precision),
    `vs_fp64` (accumulated vs the float64 single-batch gradient) and `single_vs_fp64` (that
    precision's own error): accumulation is harmless when `vs_single` is no larger than
    `single_vs_fp64`. Dropout should be off: masks differ between micro-batches and one batch.
    """
    comparison = GradientComparison(model, examples, task=task, normalization=normalization,
                                     pad_token_id=pad_token_id, device=device)
    records = []
    for precision in precisions:
        records += [comparison.record(precision, k) for k in ks]
        comparison.forget(precision)
    return records


def window_report(model: torch.nn.Module, examples: Sequence[dict], micro_batch_size: int,
                  accum_steps: int, normalization: str = "tokens",
                  partial_window: str = "step", task: str | None = None,
                  pad_token_id: int = 0) -> list[dict]:
    """For each window of an epoch (in order, no shuffling): its micro-batches' item counts,
    whether it steps, and how far its accumulated gradient is from the gradient of the same loss
    over the same examples taken as one batch (with one micro-batch, `mean_of_means` is the
    token mean). Only library calls: `Accumulator` makes the windows and the losses,
    `window_gradient` the one-batch reference.
    """
    task = task or detect_task(model)
    net = model
    windows = []
    order = list(range(len(examples)))
    batches = list(micro_batches(examples, order, micro_batch_size, pad_token_id=pad_token_id))
    acc = Accumulator(net, None, accum_steps, task=task, normalization=normalization,
                      partial_window="step")
    start = 0
    for window in acc.windows(batches):
        n_examples = sum(len(b["input_ids"]) for b in window.micro_batches)
        members = examples[start:start + n_examples]
        start += n_examples
        stepped = not (window.is_partial and partial_window == "drop")
        net.zero_grad(set_to_none=True)
        for batch in window:
            window.backward(window.loss(default_forward(net, batch), batch["labels"]))
        accumulated = gradient_vector(net)
        net.zero_grad(set_to_none=True)
        exact = window_gradient(net, members, 1, task=task, precision=_precision_of(net),
                                normalization=normalization, pad_token_id=pad_token_id)
        windows.append({
            "items": [count_items(b["labels"], task) for b in window.micro_batches],
            "examples": n_examples, "partial": window.is_partial, "stepped": stepped,
            "rel_diff": relative_difference(accumulated, exact),
        })
    return windows


def _precision_of(model: torch.nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    return "fp64" if dtype == torch.float64 else "fp32"
