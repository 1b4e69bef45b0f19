"""The seed article's claims that need training or timing: the runs of lesson 12 (seed errata).

- `one_step_vs_small_steps` (claims 3 and 9): one accumulated SGD step equals one step on the
  whole batch, not k ordinary steps on its micro-batches.
- `window_throughput` (claim 1, throughput): tokens/s of whole accumulation windows, timed in
  interleaved rounds so that a machine shared with other work slows every setting alike.
- `items_per_update` (claim 5): loss items in each optimizer step of `accumlab.train`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
from torch.nn.utils import parameters_to_vector

from accumlab.engine.collate import pad_collate
from accumlab.engine.config import TrainConfig
from accumlab.engine.gradients import relative_difference
from accumlab.engine.trainer import train
from accumlab.engine.window import Accumulator, default_forward


def _delta(model: torch.nn.Module, data: Sequence[dict], micro_batch: int, accum_steps: int,
           steps: int, lr: float, pad_token_id: int) -> torch.Tensor:
    """Parameter change after `steps` SGD steps of `accumlab.train` (float64, data in order)."""
    net = copy.deepcopy(model)
    start = parameters_to_vector(net.parameters()).detach().clone()
    cfg = TrainConfig(micro_batch_size=micro_batch, accum_steps=accum_steps, max_steps=steps,
                      lr=lr, optimizer="sgd", shuffle=False, precision="fp64", device="cpu",
                      progress=False, pad_token_id=pad_token_id)
    train(net, list(data), cfg)
    return parameters_to_vector(net.parameters()).detach() - start


def one_step_vs_small_steps(model: torch.nn.Module, examples: Sequence[dict], micro_batch: int,
                            accum_steps: int, lr: float, *, pad_token_id: int = 1) -> dict:
    """SGD updates from the same b·k examples three ways, in float64 with `accumlab.train`:
    one window of k micro-batches of b, one batch of b·k, and k ordinary steps of b, all at
    learning rate `lr`.

    Returns the relative differences of the parameter changes, accumulated vs one batch
    (rounding only) and accumulated vs k small steps (of order (k − 1)/k), and their norms.
    """
    n = micro_batch * accum_steps
    if len(examples) < n:
        raise ValueError(f"need {n} examples for {accum_steps} micro-batches of {micro_batch}")
    data = list(examples[:n])
    acc = _delta(model, data, micro_batch, accum_steps, 1, lr, pad_token_id)
    one = _delta(model, data, n, 1, 1, lr, pad_token_id)
    small = _delta(model, data, micro_batch, 1, accum_steps, lr, pad_token_id)
    return {"accumulated_vs_one_batch": relative_difference(acc, one),
            "accumulated_vs_small_steps": relative_difference(acc, small),
            "step_norms": {"accumulated": float(acc.norm()), "one batch": float(one.norm()),
                           "small steps": float(small.norm())}}


def window_throughput(model: torch.nn.Module, blocks: Sequence[dict],
                      settings: Sequence[tuple[int, int]], *, rounds: int = 5,
                      lr: float = 1e-3) -> list[dict]:
    """Tokens/s of one accumulation window (k forward/backward passes of b sequences, one clip-
    free AdamW step, zero_grad) for each (b, k) in `settings`.

    `blocks` are equal-length causal-LM rows (`accumlab.lab.throughput.corpus_blocks`). Every
    round times one window of each setting in turn (one untimed warm-up round first); a
    setting's result is its median over the rounds, so load from other processes that drifts
    over time hits all settings alike. Returns one record per setting: `micro_batch`,
    `accum_steps`, `batch` (b·k), `tokens_per_s` (median) and `per_round`.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    net = copy.deepcopy(model)
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    windows = []
    for b, k in settings:
        if b * k > len(blocks):
            raise ValueError(f"setting {b} x {k} needs {b * k} blocks, got {len(blocks)}")
        windows.append([pad_collate(blocks[j * b:(j + 1) * b]) for j in range(k)])
    rates: list[list[float]] = [[] for _ in settings]
    for r in range(rounds + 1):
        for i, micro in enumerate(windows):
            tokens = sum(int(m["input_ids"].numel()) for m in micro)
            start = time.perf_counter()
            acc = Accumulator(net, opt, len(micro), task="causal_lm")
            (window,) = list(acc.windows(micro))
            for batch in window:
                window.backward(window.loss(default_forward(net, batch), batch["labels"]))
            window.step()
            if r:  # round 0 warms up allocator and kernels
                rates[i].append(tokens / (time.perf_counter() - start))
    return [{"micro_batch": b, "accum_steps": k, "batch": b * k,
             "tokens_per_s": statistics.median(rates[i]), "per_round": rates[i]}
            for i, (b, k) in enumerate(settings)]


def items_per_update(model: torch.nn.Module, examples: Sequence[dict], micro_batch: int,
                     accum_steps: int, *, steps: int = 1, pad_token_id: int = 1) -> list[int]:
    """Loss items (examples for a classifier) in each optimizer step of `accumlab.train`."""
    cfg = TrainConfig(micro_batch_size=micro_batch, accum_steps=accum_steps, max_steps=steps,
                      lr=1e-3, optimizer="sgd", shuffle=False, device="cpu", progress=False,
                      pad_token_id=pad_token_id)
    return [r["items"] for r in train(copy.deepcopy(model), list(examples), cfg).history]


__all__ = ["items_per_update", "one_step_vs_small_steps", "window_throughput"]
