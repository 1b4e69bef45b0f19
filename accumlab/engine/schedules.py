"""Learning-rate schedules counted in optimizer steps (never micro-batches)."""

from __future__ import annotations

import math

import torch


def lr_multiplier(
    step: int, *, total_steps: int, warmup_steps: int = 0, schedule: str = "constant",
    min_lr_ratio: float = 0.0,
) -> float:
    """Factor on the base LR for the optimizer step with 0-based index `step`.

    Linear warmup over `warmup_steps` steps (the first step already uses 1/warmup), then
    constant, linear or cosine decay towards `min_lr_ratio` at `total_steps`.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
    schedule: str = "constant", min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose `step()` must be called once per optimizer step."""

    def factor(step: int) -> float:
        return lr_multiplier(step, total_steps=total_steps, warmup_steps=warmup_steps,
                             schedule=schedule, min_lr_ratio=min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def scaled_lr(lr: float, batch: int, base_batch: int, rule: str = "linear") -> float:
    """The learning rate for `batch` given one tuned at `base_batch`.

    "linear" (Goyal et al. 2017, SGD): lr x batch/base. "sqrt" (Krizhevsky 2014; Malladi et al.
    2022 for Adam): lr x sqrt(batch/base). "none": lr unchanged. Both rules only hold below
    the critical batch size; beyond it a larger batch buys no fewer steps.
    """
    if batch < 1 or base_batch < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch={batch}, base_batch={base_batch}")
    ratio = batch / base_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    if rule == "none":
        return lr
    raise ValueError(f"lr scaling rule must be 'none', 'linear' or 'sqrt', got {rule!r}")


def ramp_accum_steps(tokens_seen: int, accum_steps: int, ramp_tokens: int) -> int:
    """Micro-batches in the next window of a batch-size ramp counted in tokens.

    The window grows linearly from 1 micro-batch (at 0 tokens) to `accum_steps` (at
    `ramp_tokens` training tokens), as GPT-3 ramped its batch over the first 4-12B tokens.
    """
    if ramp_tokens <= 0 or tokens_seen >= ramp_tokens:
        return accum_steps
    return 1 + int((accum_steps - 1) * tokens_seen / ramp_tokens)


def warmup_seq_len(step: int, full_len: int, start: int, warmup_steps: int,
                   multiple: int = 8) -> int:
    """Sequence length at optimizer step `step` of a linear sequence-length warmup.

    Grows from `start` to `full_len` over `warmup_steps` steps, rounded down to a multiple of
    `multiple` (friendly to matrix kernels) and never below `start` (Li et al. 2022).
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return full_len
    length = start + (full_len - start) * step / warmup_steps
    length = max(start, int(length) // multiple * multiple)
    return min(full_len, length)
