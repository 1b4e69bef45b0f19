"""The output layer and the cross-entropy in one chunked pass: the whole logits never exist.

For R positions, a vocabulary of V and a width of H, the usual loss keeps the [R, V] logits
(and a float32 copy) alive from the forward to the backward: 3.3 GB of float32 for GPT-2 small
at 16 x 1024. `linear_cross_entropy` walks the positions in chunks. For each chunk it computes
the logits, the summed loss and at once the gradients of the hidden states and of the head's
weight and bias; it keeps only those ([R, H] and [V, H]), and the backward multiplies them by
the incoming gradient (1/N for a window's share). This is Liger Kernel's fused linear
cross-entropy method, written in plain torch so that it runs on a CPU and compiles; where the
`liger_kernel` package is installed, `linear_cross_entropy(..., backend="liger")` uses it.

Per position the numbers are the unfused ones: logits = h W^T + b (in the autocast dtype under
autocast), loss = logsumexp(logits) - logits[label] in float32 or wider, and
d loss / d logits = softmax(logits) - onehot(label); only the order of the sums over positions
that make the weight's gradient changes (float64: equal to the unfused loss to ~1e-16).
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk (GPT-2's vocabulary: 1335 positions)


def chunks_for(rows: int, vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """How many chunks keep one chunk's float32 logits under `budget_bytes` (at least 1)."""
    return max(1, math.ceil(rows * vocab * 4 / budget_bytes))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         bias: torch.Tensor | None = None, *, chunks: int = 1,
                         backend: str = "torch") -> torch.Tensor:
    """Sum over positions of cross_entropy(hidden @ weight.T + bias, labels); -100 is ignored.

    `hidden` is [R, H] (or [..., H], flattened), `labels` holds R class ids, `weight` is the
    [V, H] output layer. `chunks` splits the R positions into that many near-equal pieces (a
    fixed count, so a compiled graph does not depend on R). Returns a scalar tensor in float32
    (float64 for float64 inputs).
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden positions but {labels.shape[0]} labels")
    if backend == "liger":
        return _liger(hidden, weight, labels, bias)
    if backend != "torch":
        raise ValueError(f"backend must be 'torch' or 'liger', got {backend!r}")
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if not needs_grad:
        with torch.no_grad():
            return _chunked(hidden, weight, bias, labels, chunks, grads=(False, False, False))[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, labels, chunks)


class _LinearCrossEntropy(torch.autograd.Function):
    """Loss and gradients computed together in the forward; the backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunks):
        wanted = (hidden.requires_grad, weight.requires_grad,
                  bias is not None and bias.requires_grad)
        total, grad_h, grad_w, grad_b = _chunked(hidden, weight, bias, labels, chunks, wanted)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors

        def scaled(g):
            return None if g is None else g * grad_total.to(g.dtype)

        return scaled(grad_h), scaled(grad_w), scaled(grad_b), None, None


def _chunked(hidden, weight, bias, labels, chunks: int, grads: tuple[bool, bool, bool]):
    """(summed loss, d/d hidden, d/d weight, d/d bias) chunk by chunk; None where not wanted."""
    want_h, want_w, want_b = grads
    pieces_h = []
    grad_w = torch.zeros_like(weight) if want_w else None
    grad_b = torch.zeros_like(bias) if want_b else None
    total = None
    for h, y in zip(hidden.tensor_split(chunks), labels.tensor_split(chunks)):
        logits = h @ weight.T  # the autocast dtype under autocast, like the unfused head
        if bias is not None:
            logits = logits + bias
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        valid = y != IGNORE_INDEX
        target = y.clamp(min=0).unsqueeze(1)
        lse = wide.logsumexp(dim=1, keepdim=True)
        losses = (lse - wide.gather(1, target)).squeeze(1) * valid
        part = losses.sum()
        total = part if total is None else total + part
        if want_h or want_w or want_b:
            d = (wide - lse).exp_()  # softmax
            d.scatter_add_(1, target, torch.full_like(lse, -1.0))  # minus the one-hot label
            d = (d * valid.unsqueeze(1)).to(logits.dtype)  # as autograd casts it back
            if want_h:
                pieces_h.append((d @ weight.to(d.dtype)).to(hidden.dtype))
            if want_w:
                grad_w += (d.T @ h.to(d.dtype)).to(weight.dtype)
            if want_b:
                grad_b += d.sum(dim=0).to(bias.dtype)
    grad_h = torch.cat(pieces_h) if want_h else None
    return total, grad_h, grad_w, grad_b


def liger_available() -> bool:
    """Whether Liger Kernel's fused linear cross-entropy can be used (installed, and a GPU)."""
    if not torch.cuda.is_available():
        return False
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # noqa: F401
    except Exception:  # not installed, or no Triton: the torch path is used
        return False
    return True


def _liger(hidden, weight, labels, bias):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")(
        weight, hidden, labels, bias)
    return out[0] if isinstance(out, tuple) else out
