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


class NonFiniteWarning(UserWarning):
    """fp16: the GradScaler skipped a window whose loss or gradient was not finite."""


MAX_SKIPS_IN_A_ROW = 30  # fp16 windows skipped in a row before training counts as diverged


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
        self.skipped_in_a_row = 0  # fp16 windows the GradScaler skipped since the last step

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
        return self.share(summed_loss(logits, labels, acc.task, acc.normalization,
                                      acc.loss_chunk_size))

    def share(self, total: torch.Tensor) -> torch.Tensor:
        """The share of L_W of a micro-batch whose summed item loss is `total`.

        `total` is what `losses.summed_loss` returns (a compiled micro-step computes it in its
        own graph); dividing by N here keeps N out of that graph, so a new N never recompiles.
        """
        acc = self.acc
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
        if not distributed.is_distributed():
            return self._loss_sum.reshape(())
        value = self._loss_sum.to(distributed.collective_device()).reshape(1).clone()
        return distributed.all_reduce_sum(value).reshape(())

    def step(self) -> WindowRecord:
        """Clip, unscale, step the optimizer and scheduler, and zero gradients: once.

        A loss or gradient norm that is not finite never reaches the weights: the gradients
        are cleared and FloatingPointError is raised (under fp16 the GradScaler skips the
        window instead, with a NonFiniteWarning). The host reads the loss and the norm once.
        """
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
        if scaler is not None:
            scaler.unscale_(opt)
        if acc.clip_grad_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, acc.clip_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # FSDP: the global norm of the sharded gradient
            norm = norm.full_tensor()
        if scaler is not None:
            return self._scaled_step(loss_t, norm, lr)
        # A fused optimizer skips its update on device when found_inf is 1, so the host reads
        # L_W and the gradient norm only after the step is queued: one sync per window.
        if _supports_found_inf(opt):
            finite = torch.isfinite(norm) & torch.isfinite(loss_t.to(norm.device))
            opt.found_inf = (~finite).float().reshape(())
            opt.step()
            del opt.found_inf
            loss, norm_value = _read(loss_t, norm)
        else:
            loss, norm_value = _read(loss_t, norm)
            if math.isfinite(loss) and math.isfinite(norm_value):
                opt.step()
        if not (math.isfinite(loss) and math.isfinite(norm_value)):
            opt.zero_grad(set_to_none=True)  # a caller that catches the error starts clean
            self._checked(loss)
            raise FloatingPointError(
                f"the gradient norm is {norm_value} although the window loss is {loss:.6g}: "
                "an overflow in the backward pass, or weights already too large. Lower the "
                "learning rate or turn on clip_grad_norm. The weights were not updated and the "
                "gradients were cleared."
            )
        if acc.scheduler is not None:
            acc.scheduler.step()
        opt.zero_grad(set_to_none=True)
        return WindowRecord(loss, self.n_items, len(self), norm_value, lr, True, None,
                            self._noise_extra(norm_value))

    def _scaled_step(self, loss_t: torch.Tensor, norm: torch.Tensor, lr: float) -> WindowRecord:
        """fp16: the GradScaler skips a window whose loss or gradient is not finite."""
        acc, opt, scaler = self.acc, self.acc.optimizer, self.acc.scaler
        loss, norm_value = _read(loss_t, norm)
        scale_before = scaler.get_scale()
        if math.isfinite(loss):
            scaler.step(opt)  # skipped by the scaler itself when the gradient overflowed
            scaler.update()
            stepped = scaler.get_scale() >= scale_before  # the scale drops on an overflow
        else:  # the gradient may still look finite: skip, and lower the scale as on overflow
            scaler.update(new_scale=scale_before * scaler.get_backoff_factor())
            stepped = False
        opt.zero_grad(set_to_none=True)
        if stepped:
            acc.skipped_in_a_row = 0
            if acc.scheduler is not None:
                acc.scheduler.step()
            return WindowRecord(loss, self.n_items, len(self), norm_value, lr, True, None,
                                self._noise_extra(norm_value))
        acc.skipped_in_a_row += 1
        if acc.skipped_in_a_row >= MAX_SKIPS_IN_A_ROW:
            raise FloatingPointError(
                f"fp16: {acc.skipped_in_a_row} windows in a row had a loss or gradient that is "
                f"not finite, although the GradScaler lowered the loss scale to "
                f"{scaler.get_scale():g}: training diverged or the data holds invalid values. "
                "Lower the learning rate or use bf16/fp32. The weights were not updated."
            )
        warnings.warn(
            "fp16: a window's loss or gradient was not finite, so the GradScaler skipped its "
            "update and lowered the loss scale (a few skips at the start are normal while the "
            "scale settles; many mean that training diverged)",
            NonFiniteWarning,
            stacklevel=3,
        )
        what = "loss" if not math.isfinite(loss) else "gradient"
        reason = f"fp16: the {what} was not finite, the GradScaler skipped the step"
        return WindowRecord(loss, self.n_items, len(self), norm_value, lr, False, reason)

    def _noise_extra(self, norm_value: float) -> dict:
        if self._small_sq is None:
            return {}
        return {"small_sq": float(self._small_sq), "small_items": self.item_counts[0],
                "big_sq": norm_value ** 2, "big_items": self.n_items}

    def _checked(self, loss: float) -> float:
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the window loss is {loss}: training diverged or the data holds invalid "
                "values. Lower the learning rate, turn on clip_grad_norm, or use a wider "
                "precision (fp32 instead of fp16). The weights were not updated."
            )
        return loss


def _read(loss_t: torch.Tensor, norm: torch.Tensor) -> tuple[float, float]:
    """L_W and the gradient norm on the host, with one device sync for both."""
    both = torch.stack([loss_t.detach().reshape(()).double().to(norm.device),
                        norm.detach().reshape(()).double()])
    loss, norm_value = both.tolist()
    return loss, norm_value


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
