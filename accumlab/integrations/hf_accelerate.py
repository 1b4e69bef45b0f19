"""Exact windows inside Accelerate's `accumulate()`: each micro-batch's share of L_W.

Accelerate leaves the normalisation to the user: `accelerator.backward` divides every loss by
k = `gradient_accumulation_steps` (also in a short last window), and a per-micro-batch mean
loss then gives the mean of means. Two lines change in an Accelerate loop:

    windows = AccelerateWindows(accelerator, model=model)     # or task="causal_lm"
    for batch in windows.batches(train_loader):               # was: for batch in train_loader
        with accelerator.accumulate(model):
            logits = model(**batch).logits
            loss = windows.loss(logits, batch["labels"])      # was: loss = outputs.loss
            accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()

`batches` reads each window ahead (k micro-batches, fewer at the end of the loader), counts its
items N (label tokens after the causal shift, masked tokens, or examples) and sums N over the
processes with `accelerator.reduce`. `loss` returns sum(item losses) x k x processes / N: the
x k cancels `backward`'s / k, the x processes cancels DDP's averaging, so the window's gradient
is that of L_W. A short last window is divided by its own N.

Accelerate decides the step in `accumulate()`: `sync_gradients` is true every k-th micro-batch
or when its prepared loader has yielded its last batch (`end_of_dataloader`, with
`sync_with_dataloader`, the default). Reading ahead makes that flag true from the *first*
micro-batch of the last window, so `loss` turns `sync_gradients` back off until the window's
last micro-batch (the Trainer sets the same flag for its own prefetching); under DDP those
micro-batches then all-reduce, which costs time and changes nothing (averaging is linear).
If Accelerate would not step after a window's last micro-batch (no `accumulate()`, a loader
that is not prepared with a short last window, `sync_with_dataloader=False`), `loss` raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator

import torch

from accumlab.engine.config import NORMALIZATIONS, TASKS
from accumlab.engine.losses import count_items, detect_task, summed_loss


class AccelerateWindows:
    """Read Accelerate micro-batches a window ahead and give each its share of L_W.

    Args:
        accelerator: the `accelerate.Accelerator` (its `gradient_accumulation_steps` is k).
        model: the model, to detect the task from its class; or give `task`.
        task: "causal_lm", "masked_lm" or "classification".
        normalization: "tokens" (default) or "samples".
    """

    def __init__(self, accelerator, *, model: torch.nn.Module | None = None,
                 task: str | None = None, normalization: str = "tokens"):
        if task is None and model is None:
            raise ValueError("AccelerateWindows needs model= (to detect the task) or task=")
        task = task or detect_task(model)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if normalization not in NORMALIZATIONS or normalization == "mean_of_means":
            raise ValueError(f"normalization must be 'tokens' or 'samples', got {normalization!r}")
        self.accelerator = accelerator
        self.task = task
        self.normalization = normalization
        self.n_items = 0  # N of the current window, summed over processes
        self.window_size = 0  # micro-batches in the current window on this process
        self.index = -1  # position of the current micro-batch in its window
        self.windows_read = 0

    @property
    def is_last(self) -> bool:
        """True on the current window's last micro-batch (Accelerate steps after it)."""
        return self.index == self.window_size - 1

    def batches(self, loader: Iterable[dict]) -> Iterator[dict]:
        """Yield the micro-batches of `loader`, each window read (and counted) ahead.

        Windows hold k micro-batches; the last one of the loader holds what is left. Each pass
        starts a new window, so Accelerate's micro-batch counter is set back to 0 (as its own
        end-of-loader reset does; an epoch left early would otherwise shift every window).
        """
        k = self.accelerator.gradient_accumulation_steps
        state = self.accelerator.gradient_state
        self.accelerator.step = 0
        iterator = iter(loader)
        finished = False
        while not finished:
            window = []
            while len(window) < k:
                try:
                    window.append(next(iterator))
                except StopIteration:
                    finished = True
                    break
                if state.end_of_dataloader:  # a prepared loader just gave its last batch
                    finished = True
                    break
            if not window:
                return
            self._start_window(window)
            for i, batch in enumerate(window):
                self.index = i
                yield batch
        next(iterator, None)  # let a prepared loader finish (it leaves the gradient state)

    def _start_window(self, window: list[dict]) -> None:
        for batch in window:
            if "labels" not in batch:
                raise ValueError("AccelerateWindows needs `labels` in every batch (-100 where "
                                 "no loss is taken)")
        local = sum(count_items(b["labels"], self.task, self.normalization) for b in window)
        total = torch.tensor([local], dtype=torch.int64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        self.n_items = int(total.item())
        self.window_size = len(window)
        self.index = -1
        self.windows_read += 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of L_W, scaled for `accelerator.backward` and DDP.

        Call it inside `with accelerator.accumulate(model):`, once per micro-batch.
        """
        if self.index < 0:
            raise RuntimeError("AccelerateWindows.loss called outside a window: iterate "
                               "windows.batches(loader) and call loss once per micro-batch")
        self._check_sync()
        total = summed_loss(logits, labels, self.task, self.normalization)
        if self.n_items == 0:
            warnings.warn("every label in this window is -100: its loss is 0, but Accelerate "
                          "still steps the optimizer (momentum, weight decay)", stacklevel=2)
            return total * 0.0
        scale = self.accelerator.gradient_accumulation_steps * self.accelerator.num_processes
        return total * (scale / self.n_items)

    def _check_sync(self) -> None:
        state = self.accelerator.gradient_state
        if self.is_last and not state.sync_gradients:
            raise RuntimeError(
                f"Accelerate will not step after this window's last micro-batch (window of "
                f"{self.window_size}, gradient_accumulation_steps="
                f"{self.accelerator.gradient_accumulation_steps}): call loss inside "
                "`with accelerator.accumulate(model):`, iterate the loader returned by "
                "accelerator.prepare, and keep sync_with_dataloader=True so that a short last "
                "window steps")
        if not self.is_last and state.sync_gradients:
            # read-ahead: the loader's end flag is up before the last window is used up
            state._set_sync_gradients(False)
