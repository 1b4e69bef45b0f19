"""Training memory: an analytic model, a measurement helper and an accumulation planner.

The analytic model adds up what a training step of a GPT-2-style decoder keeps in memory:

- model states: weights, gradients and optimizer states. AdamW keeps two states per
  parameter, so fp32 or mixed-precision training holds about 16 bytes per parameter
  (Rajbhandari et al. 2019, "ZeRO");
- activations saved for backward, per layer ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit with
  dropout (Korthikanti et al. 2022): they grow with micro-batch b times sequence length s, and
  the ``a*s*s*b`` attention-score part disappears with fused (flash) attention;
- logits and their loss buffers, ``b*s*V`` elements several times over.

Accumulation changes only the last two: they depend on the micro-batch, the states do not.
This is the textbook count for pure 16-bit kernels. Real PyTorch autocast training keeps more
(the residual stream and LayerNorms in float32, GELUs built from several saved operations,
float32 copies of the logits for the loss), so measure: `measure_training_memory` measures one
real step, and `fit_linear` turns a few measured micro-batches into a prediction for the rest.
No plotting or widget code lives here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

GIB = 2**30
MIB = 2**20

# bytes per element of the forward pass's compute dtype
COMPUTE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
# bytes per parameter of the master weights (and so of the accumulated gradients)
MASTER_BYTES = {"fp64": 8, "fp32": 4, "bf16": 4, "fp16": 4}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}

# Reference measurements on one H100 80GB (not computed by the notebooks; quote them as such).
# GPT-2 small (124M), sequence 1024, bf16 autocast over float32 weights, fused AdamW, PyTorch
# eager mode (no torch.compile) with transformers' default attention (SDPA, a fused kernel):
# peak torch.cuda.max_memory_allocated in GiB per micro-batch; micro-batch 64 runs out of memory.
REFERENCE_H100_GPT2_SMALL = {
    "description": "one H100 80GB, GPT-2 small, sequence 1024, bf16 autocast, eager mode "
                   "(no torch.compile), default SDPA attention",
    "size": "gpt2-small",
    "seq_len": 1024,
    "precision": "bf16",
    "attention": "fused",
    "gpu_gib": 80,
    "peak_gib": {1: 3.5, 4: 7.6, 8: 13.0, 16: 23.8, 32: 45.5},
    "out_of_memory": (64,),
}
# The same setting measured once more on one H100 with one `accumlab.train` step (torch 2.11,
# transformers 5.17), with SDPA and with eager attention (which stores the s x s scores).
REFERENCE_H100_ATTENTION = {
    "description": "one H100 80GB, GPT-2 small, sequence 1024, bf16, one accumlab.train step",
    "sdpa": {1: 2.19, 4: 7.03, 8: 12.83, 16: 24.42, 32: 47.61},
    "eager": {1: 3.53, 4: 10.26, 8: 19.29, 16: 37.35, 32: 73.46},
}


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a GPT-2-style decoder's memory."""

    layers: int
    hidden: int
    heads: int
    vocab: int
    positions: int

    @classmethod
    def gpt2(cls, size: str = "tiny", vocab: int | None = None,
             positions: int | None = None) -> ModelShape:
        """The shape `accumlab.models.make_model("gpt2", size)` builds (same defaults)."""
        from .models import DEFAULT_VOCAB, SIZES

        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}: choose one of {list(SIZES)}")
        layers, hidden, heads = SIZES[size]
        if vocab is None:
            vocab = 50257 if size == "gpt2-small" else DEFAULT_VOCAB
        if positions is None:
            positions = 1024 if size == "gpt2-small" else 256
        return cls(layers, hidden, heads, vocab, positions)

    @property
    def parameters(self) -> int:
        """Exact parameter count of GPT2LMHeadModel with tied embeddings.

        Per layer 12h^2 + 13h (QKV, projection, two MLP matrices, biases, two LayerNorms),
        plus token and position embeddings and the final LayerNorm.
        """
        h = self.hidden
        return self.layers * (12 * h * h + 13 * h) + (self.vocab + self.positions) * h + 2 * h

    def to_dict(self) -> dict:
        return asdict(self)


def _check_precision(precision: str) -> None:
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision must be one of {list(COMPUTE_BYTES)}, got {precision!r}")


def model_state_bytes(n_params: int, precision: str = "bf16", optimizer: str = "adamw"
                      ) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer states for `n_params` parameters.

    fp32 and mixed precision (bf16/fp16 autocast over float32 master weights, as accumlab
    trains) both keep 4 + 4 + 8 = 16 bytes per parameter with AdamW; fp64 doubles it. Under
    autocast the forward also caches a 16-bit copy of the weights (2 bytes per parameter).
    """
    _check_precision(precision)
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
    _check_precision(precision)
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
    _check_precision(precision)
    e = COMPUTE_BYTES[precision]
    per_element = max(4, e) if saved_only else e + (4 if e < 4 else 0) + max(4, e)
    return micro_batch * seq_len * shape.vocab * per_element


def estimate_memory(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                    optimizer: str = "adamw", attention: str = "eager", dropout: bool = True
                    ) -> dict:
    """Every component of one training step's memory, in bytes, and their `total`."""
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    if seq_len > shape.positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {shape.positions} "
                         "positions")
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


# ---------------------------------------------------------------- measurement


def saved_activation_bytes(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                           task: str | None = None) -> dict[str, int]:
    """Bytes the forward pass and loss save for backward, counted exactly on any device.

    Every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`;
    distinct storages are counted once and the model's own parameters are left out. This is
    deterministic, unlike sampling the process's RSS, and works on CPU. The model's parameters
    must already be in the precision's parameter dtype (`accumlab.precision.PARAM_DTYPES`).

    Returns ``{"total", "logits", "layers"}``: `logits` counts the saved tensors as wide as the
    vocabulary (the loss's log-probabilities), `layers` the rest.
    """
    from .losses import detect_task, mean_loss
    from .precision import Precision
    from .window import default_forward

    task = task or detect_task(model)
    device = next(model.parameters()).device
    prec = Precision(precision, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, last dimension)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            last = t.shape[-1] if t.dim() else 0
            seen[ptr] = (max(seen.get(ptr, (0, 0))[0], storage.nbytes()), last)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with prec.autocast():
            logits = default_forward(model, batch)
        loss = mean_loss(logits, batch["labels"].to(device), task)
    vocab = logits.shape[-1]
    del loss, logits
    total = sum(n for n, _ in seen.values())
    wide = sum(n for n, last in seen.values() if last == vocab)
    return {"total": total, "logits": wide, "layers": total - wide}


def measure_training_memory(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                            optimizer: str = "adamw", task: str | None = None) -> dict:
    """Memory of one real training step (forward, loss, backward, optimizer step), in bytes.

    On a CUDA device the peak is `torch.cuda.max_memory_allocated` over the step (method
    "cuda_peak"). On CPU, where no allocator keeps a peak, it is the sum of the model states
    actually allocated (weights, gradients, optimizer states after the step) and the bytes
    saved for backward (`saved_activation_bytes`, method "saved_tensors"); it leaves out
    short-lived temporaries, so it is a lower bound of the true peak.
    """
    from .losses import detect_task, mean_loss
    from .precision import Precision
    from .window import default_forward

    task = task or detect_task(model)
    device = next(model.parameters()).device
    prec = Precision(precision, device)
    model.to(dtype=prec.param_dtype)
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = (torch.optim.AdamW(params, lr=1e-6, fused=cuda or None) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-6, momentum=0.9 if optimizer == "sgd_momentum"
                                else 0.0))  # fused AdamW on CUDA, as accumlab.train uses
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with prec.autocast():
        logits = default_forward(model, batch)
    loss = mean_loss(logits, batch["labels"].to(device), task)
    loss.backward()
    del loss, logits
    opt.step()
    states = _tensor_bytes(list({id(p): p for p in params}.values()))
    grads = _tensor_bytes([p.grad for p in params if p.grad is not None])
    optim = _tensor_bytes([t for s in opt.state.values() for t in s.values()
                           if isinstance(t, torch.Tensor) and t.dim() > 0])
    result = {"method": "cuda_peak" if cuda else "saved_tensors", "weights": states,
              "gradients": grads, "optimizer": optim}
    if cuda:
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device)
        result["before_step"] = before
        result["activations"] = None
    else:
        model.zero_grad(set_to_none=True)
        result["activations"] = saved_activation_bytes(model, batch, precision, task)["total"]
        result["peak"] = states + grads + optim + result["activations"]
    del opt
    model.zero_grad(set_to_none=True)
    return result


def _tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def gib(n_bytes: float) -> float:
    """Bytes to GiB (2**30 bytes)."""
    return n_bytes / GIB


def fits(n_bytes: float, budget_gib: float) -> bool:
    """Whether `n_bytes` fit in a memory budget given in GiB."""
    return n_bytes <= budget_gib * GIB and math.isfinite(n_bytes)


__all__ = [
    "GIB", "MIB", "REFERENCE_H100_ATTENTION", "REFERENCE_H100_GPT2_SMALL", "ModelShape",
    "activation_bytes", "estimate_memory", "fit_linear", "fits", "gib", "largest_fitting",
    "largest_micro_batch", "logits_bytes",
    "measure_training_memory", "memory_sweep", "model_state_bytes", "plan_accumulation",
    "saved_activation_bytes",
]
