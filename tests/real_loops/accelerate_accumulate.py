"""Accelerate's `accumulate()` context manager, as its example uses it.

Repository huggingface/accelerate, commit 16cb6eb80dd9aa8b4df1a63ef57863e455d53b83: file
examples/by_feature/gradient_accumulation.py (the epoch loop), with the library code it relies
on: `Accelerator.accumulate`, `_do_sync` and `backward` (src/accelerate/accelerator.py),
`AcceleratedOptimizer.step/zero_grad` (optimizer.py), `AcceleratedScheduler.step`
(scheduler.py).

Every micro-batch runs `with accelerator.accumulate(model):` forward, `accelerator.backward(
output.loss)`, `optimizer.step()`, `lr_scheduler.step()`, `optimizer.zero_grad()`.
`_do_sync` sets `sync_gradients` when `step % num_steps == 0` (its counter is reset at the end of
the dataloader, where it always syncs); `backward` always divides the loss by
`gradient_accumulation_steps`; the wrapped optimizer steps and zeroes only when syncing; the
wrapped scheduler steps only when syncing (`num_processes` times; one process here).

Expected: mean of means (each micro-batch's mean loss / k) and a short last window still
divided by k (partial_window_scaled_by_k, as frameworks.md notes for Accelerate). Clipping is
not in the example.
"""

import contextlib

EXPECTED = ["mean_of_means", "partial_window_scaled_by_k"]
OTHER = []
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": "m/k"}


class Accelerator:
    """The arithmetic of accelerate's gradient accumulation, one process, no mixed precision."""

    def __init__(self, gradient_accumulation_steps):
        self.num_steps, self.step, self.sync_gradients = gradient_accumulation_steps, 0, True
        self.end_of_dataloader = False

    @contextlib.contextmanager
    def accumulate(self, model):
        if self.end_of_dataloader:  # _do_sync
            self.step, self.sync_gradients = 0, True
        else:
            self.step += 1
            self.sync_gradients = self.step % self.num_steps == 0
        yield

    def backward(self, loss):
        (loss / self.num_steps).backward()


class Optimizer:  # AcceleratedOptimizer
    def __init__(self, optimizer, accelerator):
        self.optimizer, self.acc = optimizer, accelerator

    def step(self):
        if self.acc.sync_gradients:
            self.optimizer.step()

    def zero_grad(self):
        if self.acc.sync_gradients:
            self.optimizer.zero_grad(set_to_none=True)


class Scheduler:  # AcceleratedScheduler
    def __init__(self, scheduler, accelerator):
        self.scheduler, self.acc = scheduler, accelerator

    def step(self):
        if self.scheduler is None:
            return
        if not self.acc.sync_gradients:
            self.scheduler._step_count += 1  # adjust_scheduler
            return
        self.scheduler.step()


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None):
    accelerator = Accelerator(gradient_accumulation_steps=accum_steps)
    optimizer, lr_scheduler = Optimizer(optimizer, accelerator), Scheduler(scheduler, accelerator)
    for step, batch in enumerate(micro_batches):
        accelerator.end_of_dataloader = (len(micro_batches) < accum_steps
                                         and step == len(micro_batches) - 1)
        with accelerator.accumulate(model):
            output = model(**batch)
            loss = output.loss
            accelerator.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
