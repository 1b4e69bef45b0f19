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
