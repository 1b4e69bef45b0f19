"""The textbook memory count: model states + activations (Korthikanti et al.) + logits.

Good for teaching what grows with the micro-batch and what does not; a lower bound for real
PyTorch training, so plan with `accumlab.lab.memory.ledger.predict_memory` instead.
"""

from __future__ import annotations

import math

from accumlab.lab.memory.shapes import (
    COMPUTE_BYTES,
    MASTER_BYTES,
    OPTIMIZER_STATES,
    ModelShape,
    check_precision,
    check_sizes,
)


def model_state_bytes(n_params: int, precision: str = "bf16", optimizer: str = "adamw"
                      ) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer states for `n_params` parameters.

    fp32 and mixed precision (bf16/fp16 autocast over float32 master weights, as accumlab
    trains) both keep 4 + 4 + 8 = 16 bytes per parameter with AdamW; fp64 doubles it. Under
    autocast the forward also caches a 16-bit copy of the weights (2 bytes per parameter).
    """
    check_precision(precision)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")
    master = MASTER_BYTES[precision]
    return {
        "weights": n_params * master,
        "gradients": n_params * master,
        "optimizer": n_params * master * OPTIMIZER_STATES[optimizer],
        "weight_copies": n_params * COMPUTE_BYTES[precision] if precision in ("bf16", "fp16")
        else 0,
    }


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                     attention: str = "eager", dropout: bool = True) -> int:
    """Activations saved for backward by all layers (Korthikanti et al. 2022, Table 2).

    Per layer in 16-bit: ``s*b*h*34 + 5*a*s*s*b`` bytes with dropout (its 1-byte masks
    included); without dropout ``32*s*b*h + 2*a*s*s*b``. Fused attention (FlashAttention, SDPA)
    keeps no ``s*s`` scores. Other precisions scale with their element size.
    """
    check_precision(precision)
    if attention not in ("eager", "fused"):
        raise ValueError(f"attention must be 'eager' or 'fused', got {attention!r}")
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    linear = 34 if dropout else 32
    scores = (5 if dropout else 2) if attention == "eager" else 0
    per_layer_16bit = s * b * h * linear + scores * a * s * s * b
    return shape.layers * per_layer_16bit * COMPUTE_BYTES[precision] // 2


def logits_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                 saved_only: bool = False) -> int:
    """Logits and loss buffers: ``b*s*V`` elements in the compute dtype, a float32 copy for the
    loss when that dtype is 16-bit, and a float32 (or wider) gradient of the logits.

    With `saved_only` only what the loss saves for backward (its log-probabilities, one
    ``b*s*V`` tensor at float32 or wider) is counted, to compare with `saved_activation_bytes`.
    """
    check_precision(precision)
    e = COMPUTE_BYTES[precision]
    per_element = max(4, e) if saved_only else e + (4 if e < 4 else 0) + max(4, e)
    return micro_batch * seq_len * shape.vocab * per_element



def estimate_memory(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                    optimizer: str = "adamw", attention: str = "eager", dropout: bool = True
                    ) -> dict:
    """Every component of one training step's memory, in bytes, and their `total`."""
    check_sizes(shape, micro_batch, seq_len)
    parts = model_state_bytes(shape.parameters, precision, optimizer)
    parts["activations"] = activation_bytes(shape, micro_batch, seq_len, precision, attention,
                                            dropout)
    parts["logits"] = logits_bytes(shape, micro_batch, seq_len, precision)
    return {
        "micro_batch": micro_batch, "seq_len": seq_len, "precision": precision,
        "parameters": shape.parameters, **parts, "total": sum(parts.values()),
    }


def memory_sweep(shape: ModelShape, micro_batches, seq_len: int, precision: str = "bf16",
                 **kwargs) -> list[dict]:
    """`estimate_memory` for several micro-batch sizes (plain records, ready to plot)."""
    return [estimate_memory(shape, b, seq_len, precision, **kwargs) for b in micro_batches]


def largest_micro_batch(shape: ModelShape, seq_len: int, budget_bytes: float,
                        precision: str = "bf16", limit: int = 4096, **kwargs) -> int:
    """The largest micro-batch whose estimate fits in `budget_bytes` (0 if none does)."""
    lo, hi = 0, limit
    while lo < hi:  # total memory grows with the micro-batch: bisect
        mid = (lo + hi + 1) // 2
        if estimate_memory(shape, mid, seq_len, precision, **kwargs)["total"] <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_accumulation(target_batch: int, max_micro_batch: int, ranks: int = 1) -> dict:
    """Split a target effective batch into micro-batch x accumulation steps x ranks exactly.

    The micro-batch is the largest divisor of ``target_batch / ranks`` that fits under
    `max_micro_batch`, so that the effective batch is the target itself.
    """
    if target_batch < 1 or max_micro_batch < 1 or ranks < 1:
        raise ValueError("target_batch, max_micro_batch and ranks must all be >= 1")
    if target_batch % ranks:
        raise ValueError(f"target_batch={target_batch} is not a multiple of ranks={ranks}")
    per_rank = target_batch // ranks
    micro = max(d for d in range(1, min(per_rank, max_micro_batch) + 1) if per_rank % d == 0)
    steps = per_rank // micro
    return {"micro_batch": micro, "accum_steps": steps, "ranks": ranks,
            "effective_batch": micro * steps * ranks}


def fit_linear(micro_batches, peaks) -> dict:
    """Least-squares line ``peak = fixed + per_sequence * micro_batch`` through measurements.

    Peak memory is linear in the micro-batch (activations and logits scale with it, the model
    states do not), so two or three measured micro-batches predict the rest. Returns the two
    coefficients and the largest relative residual of the fit.
    """
    xs, ys = [float(x) for x in micro_batches], [float(y) for y in peaks]
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("need measurements at two or more different micro-batch sizes")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    worst = max(abs(fixed + slope * x - y) / abs(y) for x, y in zip(xs, ys, strict=True))
    return {"fixed": fixed, "per_sequence": slope, "max_relative_residual": worst}


def largest_fitting(fit: dict, budget: float) -> int:
    """The largest micro-batch whose fitted peak (same unit as `budget`) fits the budget."""
    if fit["per_sequence"] <= 0:
        raise ValueError("the fitted memory does not grow with the micro-batch")
    return max(0, math.floor((budget - fit["fixed"]) / fit["per_sequence"]))


