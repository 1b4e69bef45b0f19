"""The accumulation window: k micro-batches, one optimizer step, exact normalisation.

One window of k micro-batches on each of R ranks makes one optimizer step with the gradient of

    L_W = (1 / N) * sum of item losses over the window and all ranks,

where N counts the loss-bearing items (label tokens after the causal shift, or examples). The
window is read ahead, so N is known (and summed over ranks) before the first backward, and each
micro-batch's loss is its own item-loss sum divided by N. Use it in any loop:

    acc = Accumulator(model, optimizer, accum_steps=4, scheduler=sched)
    for window in acc.windows(micro_batches):
        for batch in window:                       # DDP no_sync around the first k-1
            logits = model(input_ids=batch["input_ids"].to(dev)).logits
            window.backward(window.loss(logits, batch["labels"]))
        record = window.step()                     # clip, step, schedule, zero_grad: once
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from accumlab.engine import distributed
from accumlab.engine.config import NORMALIZATIONS, PARTIAL_WINDOW_POLICIES
from accumlab.engine.losses import count_items, summed_loss


class EmptyWindowWarning(UserWarning):
    """A window had no loss-bearing item, so its update was skipped."""


class MeanOfMeansWarning(UserWarning):
    """mean_of_means weighted micro-batches with unequal item counts unequally."""


@dataclass
class WindowRecord:
    """What one window did: the logged loss is L_W itself."""

    loss: float
    items: int
    micro_batches: int
    grad_norm: float
    lr: float
    stepped: bool
    skipped_reason: str | None = None
    extra: dict = field(default_factory=dict)


class Accumulator:
    """Groups micro-batches into windows and steps the optimizer exactly once per window.

    Args:
        model: the module being trained (DDP-wrapped under torch.distributed).
        optimizer: a torch optimizer, or None to only accumulate gradients.
        accum_steps: k, micro-batches per window on each rank.
        task: "causal_lm", "masked_lm" or "classification" (see `losses.detect_task`).
        normalization: "tokens" (default), "samples" or "mean_of_means" (teaches the bug).
        scheduler: an LR scheduler stepped once per optimizer step.
        scaler: a `torch.amp.GradScaler` for fp16; unscaled once per window.
        clip_grad_norm: max norm of the accumulated gradient, or None.
        partial_window: "step" (normalise a short last window by its own N) or "drop".
        loss_chunk_size: positions per cross-entropy chunk (see `losses.per_item_losses`), or
            None for one piece.
        noise_scale: also measure the first micro-batch's gradient norm, so that each record
            carries what `accumlab.engine.noise.NoiseScale` needs (`extra["small_sq"]` etc.).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        accum_steps: int,
        *,
        task: str,
        normalization: str = "tokens",
        scheduler=None,
        scaler: torch.amp.GradScaler | None = None,
        clip_grad_norm: float | None = None,
        partial_window: str = "step",
        loss_chunk_size: int | None = None,
        noise_scale: bool = False,
    ):
        if not isinstance(accum_steps, int) or accum_steps < 1:
            raise ValueError(f"accum_steps must be an integer >= 1, got {accum_steps!r}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if partial_window not in PARTIAL_WINDOW_POLICIES:
            raise ValueError(
                f"partial_window must be one of {PARTIAL_WINDOW_POLICIES}, got {partial_window!r}"
            )
        self.model = model
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.task = task
        self.normalization = normalization
        self.scheduler = scheduler
        self.scaler = scaler
        self.clip_grad_norm = clip_grad_norm
        self.partial_window = partial_window
        self.loss_chunk_size = loss_chunk_size
        self.noise_scale = noise_scale
        self._warned_mean_of_means = False

    def windows(self, micro_batches: Iterable[dict], sizes=None) -> Iterator[Window]:
        """Yield windows of k micro-batches (a short last one per `partial_window`).

        Call once per epoch: windows never cross the end of the iterable. Every rank must
        yield the same number of windows (a distributed sampler gives each rank equal shares).
        `sizes()`, if given, returns k for the next window (a batch-size ramp); it is called
        when that window starts to be read, after the previous window's step.
        """
        target = sizes() if sizes else self.accum_steps
        group: list[dict] = []
        for batch in micro_batches:
            group.append(batch)
            if len(group) == target:
                yield self._make_window(group, target)
                group = []
                target = sizes() if sizes else self.accum_steps
        if group and self.partial_window == "step":
            yield self._make_window(group, target)

    def _make_window(self, batches: list[dict], target: int) -> Window:
        counts = [count_items(b["labels"], self.task, self.normalization) for b in batches]
        local = sum(counts)
        total = local
        if distributed.is_distributed():
            t = torch.tensor([local], dtype=torch.int64, device=distributed.collective_device())
            total = int(distributed.all_reduce_sum(t).item())
        if (
            self.normalization == "mean_of_means"
            and len(set(counts)) > 1
            and not self._warned_mean_of_means
        ):
            self._warned_mean_of_means = True
            warnings.warn(
                f"mean_of_means: micro-batches hold unequal item counts {counts}; each item's "
                "weight now depends on which micro-batch it landed in, so the update differs "
                "from one large batch. Use loss_normalization='tokens'.",
                MeanOfMeansWarning,
                stacklevel=3,
            )
        return Window(self, batches, counts, total, target)


class Window:
    """One accumulation window. Iterate it for the micro-batches, then call `step()` once."""

    def __init__(self, acc: Accumulator, batches: list[dict], counts: list[int], total: int,
                 target: int | None = None):
        self.acc = acc
        self.micro_batches = batches
        self.item_counts = counts
        self.n_items = total  # N, summed over micro-batches and ranks
        self.is_partial = len(batches) < (target or acc.accum_steps)
        self._index = -1
        self._loss_sum: torch.Tensor | None = None  # L_W accumulated on device, no host sync
        self._small_sq: torch.Tensor | None = None  # |grad of micro-batch 0|^2, for noise scale

    @property
    def is_empty(self) -> bool:
        """True when no item in the window carries a label: the update will be skipped."""
        return self.n_items == 0

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __iter__(self) -> Iterator[dict]:
        if self.is_empty:
            return  # nothing to learn from; step() skips with a warning
        last = len(self.micro_batches) - 1
        no_sync = getattr(self.acc.model, "no_sync", None)
        for i, batch in enumerate(self.micro_batches):
            self._index = i
            # The with-block spans the caller's forward and backward of this micro-batch.
            ctx = no_sync() if (no_sync is not None and i < last) else contextlib.nullcontext()
            with ctx:
                yield batch

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of L_W, ready for backward (scaled for DDP averaging)."""
        acc = self.acc
        total = summed_loss(logits, labels, acc.task, acc.normalization, acc.loss_chunk_size)
        if acc.normalization == "mean_of_means":
            n_j = self.item_counts[self._index]
            share = total / max(n_j, 1) / len(self.micro_batches)
            if distributed.is_distributed():
                share = share / distributed.world_size()
        else:
            share = total / self.n_items
        detached = share.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        # DDP averages gradients over ranks; N is already global, so undo that average.
        return share * distributed.world_size() if distributed.is_distributed() else share

    def backward(self, loss: torch.Tensor) -> None:
        """Backward through one micro-batch's loss (scaled by the GradScaler under fp16)."""
        if self.acc.scaler is not None:
            self.acc.scaler.scale(loss).backward()
        else:
            loss.backward()
        if self.acc.noise_scale and self._index == 0 and len(self) > 1:
            self._small_sq = self._first_micro_batch_sq_norm()

    def _first_micro_batch_sq_norm(self) -> torch.Tensor:
        """|mean gradient of micro-batch 0|^2 (local to this rank), read from .grad on device.

        After the first backward .grad = (sum of its item gradients) / N, times the world size
        under DDP and the loss scale under fp16; the micro-batch's own mean multiplies by N/n_0.
        """
        grads = [p.grad for p in self.acc.model.parameters() if p.grad is not None]
        factor = self.n_items / max(self.item_counts[0], 1) / distributed.world_size()
        if self.acc.scaler is not None:
            factor = factor / self.acc.scaler.get_scale()
        return (torch.nn.utils.get_total_norm(grads).double() * factor) ** 2

    def logged_loss(self) -> float:
        """L_W over all ranks (one host sync, at the end of the window)."""
        if self._loss_sum is None:
            return float("nan")
        return float(self._global_loss_sum())

    def _global_loss_sum(self) -> torch.Tensor:
        """L_W summed over ranks, still on the device (no host sync)."""
        value = self._loss_sum.to(distributed.collective_device()).reshape(1).clone()
        return distributed.all_reduce_sum(value).reshape(())

    def step(self) -> WindowRecord:
        """Clip, unscale, step the optimizer and scheduler, and zero gradients: once."""
        acc = self.acc
        opt = acc.optimizer
        lr = float(opt.param_groups[0]["lr"]) if opt is not None else float("nan")
        params = [p for p in acc.model.parameters() if p.grad is not None]
        if self.is_empty:
            warnings.warn(
                f"an accumulation window of {len(self)} micro-batches has every label masked "
                "(-100), so it has no loss: its update was skipped. Check the labels or the "
                "collator.",
                EmptyWindowWarning,
                stacklevel=2,
            )
            if opt is not None:
                opt.zero_grad(set_to_none=True)
            return WindowRecord(float("nan"), 0, len(self), 0.0, lr, False, "no labelled items")

        loss_t = self._global_loss_sum()
        if opt is None:
            loss = self._checked(float(loss_t))
            return WindowRecord(loss, self.n_items, len(self), float("nan"), lr, False)

        scaler = acc.scaler
        # Without a GradScaler, a fused optimizer can skip the update on device when L_W is not
        # finite, so the host reads L_W only after the step is queued (one sync per window).
        guard_on_device = scaler is None and _supports_found_inf(opt) and loss_t.is_cuda
        if guard_on_device:
            opt.found_inf = (~torch.isfinite(loss_t)).float().reshape(())
        else:
            self._checked(float(loss_t))
        if scaler is not None:
            scaler.unscale_(opt)
        if acc.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, acc.clip_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        stepped = True
        if scaler is not None:
            scale_before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            stepped = scaler.get_scale() >= scale_before  # the scale drops when grads overflowed
        else:
            opt.step()
            if guard_on_device:
                del opt.found_inf
        loss = self._checked(float(loss_t))  # raises before the scheduler if L_W was not finite
        if stepped and acc.scheduler is not None:
            acc.scheduler.step()
        opt.zero_grad(set_to_none=True)
        reason = None if stepped else "fp16 overflow: GradScaler skipped the step"
        extra = {}
        if self._small_sq is not None:
            extra = {"small_sq": float(self._small_sq), "small_items": self.item_counts[0],
                     "big_sq": float(norm) ** 2, "big_items": self.n_items}
        return WindowRecord(loss, self.n_items, len(self), float(norm), lr, stepped, reason,
                            extra)

    def _checked(self, loss: float) -> float:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the window loss is {loss}: training diverged or the data holds invalid "
                "values. Lower the learning rate, turn on clip_grad_norm, or use a wider "
                "precision (fp32 instead of fp16). The weights were not updated."
            )
        return loss


def _supports_found_inf(optimizer) -> bool:
    """Fused torch optimizers read `found_inf` and skip their update on device when it is 1."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups)


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[dict],
    *,
    task: str,
    normalization: str = "tokens",
    forward=None,
) -> float:
    """Run one window's forward/backward passes without stepping; returns L_W.

    Gradients are left in `.grad` (added to whatever is there). `forward(model, batch)` returns
    logits; by default `model(input_ids=..., attention_mask=...).logits` on the model's device.
    """
    acc = Accumulator(model, None, len(micro_batches), task=task, normalization=normalization)
    forward = forward or default_forward
    (window,) = list(acc.windows(micro_batches))
    for batch in window:
        window.backward(window.loss(forward(model, batch), batch["labels"]))
    return window.logged_loss()


def default_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of `model` for a batch dict, moved to the model's device."""
    device = next(model.parameters()).device
    inputs = {"input_ids": batch["input_ids"].to(device)}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"].to(device)
    return model(**inputs).logits
