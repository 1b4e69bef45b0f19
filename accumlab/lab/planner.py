"""Plan micro-batch x accumulation steps (x activation checkpointing) for a GPU, and find the
largest micro-batch that really runs.

`plan_training` uses the analytic model `memory.predict_memory` (what PyTorch eager training
keeps at its peak): it picks the largest micro-batch that divides the per-rank batch and fits,
says what each part costs and why the next micro-batch up does not fit, and raises `PlanError`
with what to change when nothing fits. `find_largest_micro_batch` measures instead: it runs a
step at growing micro-batches until out-of-memory, then bisects.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from accumlab.lab.memory import GIB, ModelShape, predict_memory

CHECKPOINTING = ("auto", "on", "off")
# Fraction of the GPU kept free for what max_memory_allocated does not count: the CUDA
# context, cuBLAS/cuDNN workspaces and the caching allocator's fragmentation.
DEFAULT_HEADROOM = 0.10
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 10**3, "KIB": 2**10, "M": 2**20, "MB": 10**6,
          "MIB": 2**20, "G": 2**30, "GB": 10**9, "GIB": 2**30, "T": 2**40, "TB": 10**12,
          "TIB": 2**40}


class PlanError(ValueError):
    """Nothing fits: the message says what to change."""


def parse_bytes(text: str | int | float) -> int:
    """"16GB" -> 16e9 bytes, "16GiB" and "80G" -> 2**30 multiples; numbers are bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r}: write e.g. 16GB (10^9 "
                         "bytes), 16GiB or 16G (2^30 bytes), or 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class Plan:
    """A recommended split of the global batch, with the reasons."""

    micro_batch: int
    accum_steps: int
    ranks: int
    checkpointing: bool
    seq_len: int
    tokens_per_step: int
    predicted: dict
    budget_bytes: int
    gpu_memory_bytes: int
    next_up: dict | None
    reasons: list[str] = field(default_factory=list)

    @property
    def effective_batch(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.micro_batch * self.accum_steps * self.ranks

    def to_dict(self) -> dict:
        return {"micro_batch": self.micro_batch, "accum_steps": self.accum_steps,
                "ranks": self.ranks, "checkpointing": self.checkpointing,
                "seq_len": self.seq_len, "effective_batch": self.effective_batch,
                "tokens_per_step": self.tokens_per_step, "predicted": self.predicted,
                "budget_bytes": self.budget_bytes, "next_up": self.next_up,
                "reasons": list(self.reasons)}

    def __str__(self) -> str:
        ck = " x activation checkpointing" if self.checkpointing else ""
        head = (f"plan: micro-batch {self.micro_batch} x {self.accum_steps} accumulation "
                f"steps x {self.ranks} rank(s){ck} = {self.effective_batch} sequences of "
                f"{self.seq_len} = {self.tokens_per_step:,} tokens per optimizer step")
        return "\n".join([head, *("  - " + r for r in self.reasons)])


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fits(shape, micro, seq_len, budget, **kw) -> tuple[bool, dict]:
    est = predict_memory(shape, micro, seq_len, **kw)
    return est["total"] <= budget, est


def plan_training(gpu_memory_bytes: int | str, shape: ModelShape, seq_len: int,
                  global_batch_tokens: int, precision: str = "bf16", *,
                  optimizer: str = "adamw", attention: str = "sdpa",
                  checkpointing: str = "auto", loss_chunk_size: int | None = None,
                  ranks: int = 1, headroom: float = DEFAULT_HEADROOM) -> Plan:
    """Recommend micro-batch x accumulation steps (x checkpointing) for one GPU per rank.

    The global batch, `global_batch_tokens` / `seq_len` sequences, is split exactly over
    `ranks` and accumulation steps; the micro-batch is the largest divisor of the per-rank
    batch whose predicted peak (`memory.predict_memory`, gradients and AdamW states alive)
    fits in the GPU less `headroom`. `checkpointing` "auto" turns activation checkpointing on
    only when not even a micro-batch of one sequence fits without it.
    """
    gpu = parse_bytes(gpu_memory_bytes)
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom must be a fraction in [0, 1), got {headroom}")
    if seq_len < 1 or global_batch_tokens < seq_len:
        raise ValueError(f"global_batch_tokens={global_batch_tokens} must hold at least one "
                         f"sequence of seq_len={seq_len}")
    if global_batch_tokens % seq_len:
        raise ValueError(f"global_batch_tokens={global_batch_tokens} is not a multiple of "
                         f"seq_len={seq_len}: use {global_batch_tokens // seq_len * seq_len:,}")
    sequences = global_batch_tokens // seq_len
    if ranks < 1 or sequences % ranks:
        raise ValueError(f"{sequences} sequences per step do not split over ranks={ranks}: "
                         "choose a global batch that is a multiple of the rank count")
    per_rank = sequences // ranks
    budget = int(gpu * (1 - headroom))
    common = dict(precision=precision, optimizer=optimizer, attention=attention,
                  loss_chunk_size=loss_chunk_size, accum_steps=2)
    options = {"off": [False], "on": [True], "auto": [False, True]}[checkpointing]
    for ck in options:
        fitting = [d for d in _divisors(per_rank)
                   if _fits(shape, d, seq_len, budget, checkpointing=ck, **common)[0]]
        if fitting:
            break
    else:
        raise PlanError(_nothing_fits(gpu, budget, shape, seq_len, options[-1], common))
    micro = max(fitting)
    est = predict_memory(shape, micro, seq_len, checkpointing=ck, **common)
    bigger = [d for d in _divisors(per_rank) if d > micro]
    next_up = (predict_memory(shape, bigger[0], seq_len, checkpointing=ck, **common)
               if bigger else None)
    steps = per_rank // micro
    plan = Plan(micro, steps, ranks, ck, seq_len, sequences * seq_len, est, budget, gpu,
                next_up)
    plan.reasons = _reasons(plan, shape, checkpointing, common)
    return plan


def _reasons(plan: Plan, shape: ModelShape, mode: str, common: dict) -> list[str]:
    est = plan.predicted
    states = est["weights"] + est["gradients"] + est["optimizer"]
    size = common["loss_chunk_size"]
    chunks = f" (loss chunks of {size} positions)" if size else ""
    loss = (f"logits and loss {_gib(est['logits'])}{chunks}" if est["logits"] else
            "logits and loss already freed at the peak")
    out = [
        f"{shape.arch} with {shape.parameters / 1e6:,.1f}M parameters: weights, gradients "
        f"and {common['optimizer']} states take {_gib(states)} whatever the micro-batch "
        f"(accumulation does not shrink them)",
        f"{est['precision']} autocast keeps 16-bit weight copies: {_gib(est['weight_copies'])}"
        if est["weight_copies"] else f"{est['precision']}: no 16-bit weight copies",
        f"micro-batch {plan.micro_batch} x {plan.seq_len} tokens: activations "
        f"{_gib(est['activations'])} ({est['attention']} attention"
        f"{', checkpointed' if plan.checkpointing else ''}), {loss}"
        f"; predicted peak {_gib(est['total'])} at the "
        f"{est['phase']}, budget {_gib(plan.budget_bytes)} ({_gib(plan.gpu_memory_bytes)} less "
        f"{1 - plan.budget_bytes / plan.gpu_memory_bytes:.0%} headroom)",
    ]
    if plan.next_up is None:
        out.append("the whole per-rank batch fits in one micro-batch: no accumulation needed")
    else:
        out.append(f"the next micro-batch up that divides the batch, {plan.next_up['micro_batch']}, "
                   f"is predicted at {_gib(plan.next_up['total'])}: over the budget")
    if plan.checkpointing and mode == "auto":
        out.append("activation checkpointing is on because not even micro-batch 1 fits "
                   "without it (it costs about one extra forward pass, ~33% more compute)")
    elif not plan.checkpointing and mode != "on":
        on = predict_memory(shape, plan.micro_batch, plan.seq_len, checkpointing=True, **common)
        out.append(f"activation checkpointing would cut this micro-batch's peak to "
                   f"{_gib(on['total'])} for ~33% more compute; not needed")
    out.append(f"{plan.accum_steps} accumulation step(s) x {plan.ranks} rank(s) x micro-batch "
               f"{plan.micro_batch} = {plan.effective_batch} sequences = "
               f"{plan.tokens_per_step:,} tokens per optimizer step")
    return out


def _nothing_fits(gpu: int, budget: int, shape: ModelShape, seq_len: int, ck: bool,
                  common: dict) -> str:
    one = predict_memory(shape, 1, seq_len, checkpointing=ck, **common)
    states = one["weights"] + one["gradients"] + one["optimizer"] + one["weight_copies"]
    lines = [f"nothing fits in {_gib(gpu)} ({_gib(budget)} after headroom): micro-batch 1 "
             f"of {seq_len} tokens{' with activation checkpointing' if ck else ''} is "
             f"predicted at {_gib(one['total'])} (model states and weight copies "
             f"{_gib(states)}, activations "
             f"{_gib(one['activations'])}, logits and loss {_gib(one['logits'])})."]
    if states > budget:
        lines.append(f"The model states alone exceed the budget: use a GPU with at least "
                     f"{_gib(one['total'] / 0.9)}, shard them over GPUs (ZeRO/FSDP), or "
                     "train a smaller model.")
        return " ".join(lines)
    shorter = [s for s in (2**k for k in range(4, 20)) if s < seq_len and
               predict_memory(shape, 1, s, checkpointing=ck, **common)["total"] <= budget]
    if shorter:
        lines.append(f"A sequence length of {max(shorter)} would fit.")
    chunk = max(1, seq_len // 8)
    if common["loss_chunk_size"] is None and one["logits"] > 0.2 * one["total"]:
        chunked = predict_memory(shape, 1, seq_len, checkpointing=ck,
                                 **{**common, "loss_chunk_size": chunk})
        if chunked["total"] < one["total"]:
            lines.append(f"A chunked loss (loss_chunk_size={chunk}) would need "
                         f"{_gib(chunked['total'])}.")
    if not ck:
        lines.append("Try activation checkpointing (--checkpointing on).")
    lines.append(f"Or use a GPU with at least {_gib(one['total'] / 0.9)}.")
    return " ".join(lines)


# ---------------------------------------------------------------- measured search


def find_largest_micro_batch(try_step: Callable[[int], object], start: int = 1,
                             limit: int = 1024) -> dict:
    """The largest micro-batch for which `try_step(micro_batch)` runs without running out of
    memory: double from `start` until `torch.OutOfMemoryError`, then bisect between the last
    success and the first failure.

    Memory is freed between tries (gc after a failure, and `torch.cuda.empty_cache` when
    CUDA is in use).
    Other exceptions propagate. Returns ``{"largest", "tries"}`` where `tries` lists
    ``(micro_batch, ok)`` in order; `largest` is 0 when not even `start` runs.
    """
    if start < 1 or limit < start:
        raise ValueError(f"need 1 <= start <= limit, got start={start}, limit={limit}")
    tries: list[tuple[int, bool]] = []

    def runs(n: int) -> bool:
        try:
            try_step(n)
            ok = True
        except torch.OutOfMemoryError:
            ok = False
        free_memory(collect=not ok)  # a failed try's traceback can hold its tensors
        tries.append((n, ok))
        return ok

    good, bad = 0, None
    n = start
    while n <= limit:
        if not runs(n):
            bad = n
            break
        good = n
        if n == limit:
            break
        n = min(2 * n, limit)
    if good == 0:
        return {"largest": 0, "tries": tries}
    if bad is None:
        return {"largest": good, "tries": tries}
    while bad - good > 1:
        mid = (good + bad) // 2
        if runs(mid):
            good = mid
        else:
            bad = mid
    return {"largest": good, "tries": tries}


def free_memory(collect: bool = True) -> None:
    """Release what a failed or finished try left: garbage, and CUDA's cached blocks."""
    if collect:
        gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


__all__ = ["CHECKPOINTING", "DEFAULT_HEADROOM", "Plan", "PlanError",
           "find_largest_micro_batch", "parse_bytes", "plan_training"]
