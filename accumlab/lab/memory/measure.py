"""Measuring training memory: saved activations via autograd hooks, and the true peak of
live tensors over one training window (CPU profiler memory events, or CUDA's allocator)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time

import torch

from accumlab.lab.memory.shapes import OPTIMIZER_STATES


def saved_activation_bytes(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                           task: str | None = None) -> dict[str, int]:
    """Bytes the forward pass and loss save for backward, counted exactly on any device.

    Every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`;
    distinct storages are counted once and the model's own parameters are left out. This is
    deterministic, unlike sampling the process's RSS, and works on CPU. The model's parameters
    must already be in the precision's parameter dtype (`accumlab.engine.precision.PARAM_DTYPES`).

    Returns ``{"total", "logits", "layers"}``: `logits` counts the saved tensors as wide as the
    vocabulary (the loss's log-probabilities), `layers` the rest.
    """
    from accumlab.engine.losses import detect_task, mean_loss
    from accumlab.engine.precision import Precision
    from accumlab.engine.window import default_forward

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
        # detached: a saved output returned as itself would make a reference cycle (tensor ->
        # grad_fn -> saved tensor) that keeps every graph alive, about 130 MB a call here
        return t.detach()

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
    from accumlab.engine.losses import detect_task, mean_loss
    from accumlab.engine.precision import Precision
    from accumlab.engine.window import default_forward

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


def training_window(model, batch, precision: str, optimizer, accum_steps: int, task: str,
                     loss_chunk_size: int | None) -> None:
    """One accumulation window of `accum_steps` copies of `batch`, then one optimizer step."""
    from accumlab.engine.losses import count_items, summed_loss
    from accumlab.engine.precision import Precision
    from accumlab.engine.window import default_forward

    device = next(model.parameters()).device
    prec = Precision(precision, device)
    labels = batch["labels"].to(device)
    n = count_items(labels, task) * accum_steps
    kwargs = {"chunk_size": loss_chunk_size} if loss_chunk_size is not None else {}
    for _ in range(accum_steps):
        with prec.autocast():
            logits = default_forward(model, batch)
        (summed_loss(logits, labels, task, **kwargs) / n).backward()
        del logits
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_peak_memory(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                        optimizer: str = "adamw", accum_steps: int = 2, *,
                        first_step: bool = False, loss_chunk_size: int | None = None,
                        task: str | None = None) -> dict:
    """The true peak of live tensor bytes during one training window, on CPU or CUDA.

    The window runs `accum_steps` forward+backward passes of `batch` and one optimizer step,
    after a first warm-up window (so that AdamW's states exist, as in every step but the
    first) unless `first_step`. On CUDA the peak is `torch.cuda.max_memory_allocated`; on CPU
    it comes from the allocation and free events of `torch.profiler` (profile_memory=True),
    added to the bytes already alive when it starts. Both count tensors only (no allocator
    cache, no CUDA context). Returns ``{"peak", "method", "states", "seconds"}`` in bytes.
    The model is trained by the call (one or two steps at lr 1e-6); pass a copy to keep it.
    """
    from accumlab.engine.losses import detect_task
    from accumlab.engine.precision import Precision

    task = task or detect_task(model)
    device = next(model.parameters()).device
    model.to(dtype=Precision(precision, device).param_dtype)
    model.train()
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = _make_optimizer(params, optimizer, cuda)

    def window() -> None:
        training_window(model, batch, precision, opt, accum_steps, task, loss_chunk_size)

    if not first_step:
        window()
    gc.collect()
    states = _tensor_bytes([*params, *[t for s in opt.state.values() for t in s.values()
                                       if isinstance(t, torch.Tensor)]])
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        window()
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        before = _tensor_bytes([*params, *[b for b in batch.values()
                                           if isinstance(b, torch.Tensor)]]) + states - \
            _tensor_bytes(params)
        with quiet_stderr(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            window()
        peak, method = before + peak_of_memory_events(prof), "cpu_profiler"
    seconds = time.perf_counter() - t0
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    return {"peak": int(peak), "method": method, "states": states, "seconds": seconds}


def measure_peak_memory_cuda(model: torch.nn.Module, batch: dict, precision: str = "bf16",
                             optimizer: str = "adamw", accum_steps: int = 2, **kwargs) -> dict:
    """`measure_peak_memory` on a CUDA model (`max_memory_allocated` over one window)."""
    if next(model.parameters()).device.type != "cuda":
        raise ValueError("measure_peak_memory_cuda needs a model on a CUDA device: "
                         "call model.cuda() first, or use measure_peak_memory on CPU")
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return measure_peak_memory(model, batch, precision, optimizer, accum_steps, **kwargs)


def _make_optimizer(params, optimizer: str, cuda: bool) -> torch.optim.Optimizer:
    if optimizer == "adamw":  # fused on CUDA, as accumlab.train uses
        return torch.optim.AdamW(params, lr=1e-6, fused=True if cuda else None)
    if optimizer in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=1e-6,
                               momentum=0.9 if optimizer == "sgd_momentum" else 0.0)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")


@contextlib.contextmanager
def quiet_stderr():
    """Silence the profiler's C-level start/stop lines (file descriptors 1 and 2)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved = []
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved.append((fd, os.dup(fd)))
                    os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def peak_of_memory_events(prof) -> int:
    """Largest running sum of allocation (+) and free (-) sizes in a profile, in bytes."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def _tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


