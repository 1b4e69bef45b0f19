"""What fp16 stores for one logit's gradient term: the arithmetic behind lesson 08's explorer.

In a causal LM the gradient of the window loss with respect to the logit of a wrong token is
p / N: its probability p divided by the window's token count N. Under fp16 autocast with a loss
scale S that term is computed in fp16 as S·p/N, then divided by S in float32 (`unscale_`).
`fp16_term` follows one such number; `zero_share` applies the same rounding to many real
probabilities at once.
"""

from __future__ import annotations

import torch

FP16 = torch.finfo(torch.float16)
SMALLEST_SUBNORMAL = FP16.smallest_normal * FP16.eps  # 2**-24


def _check(n_tokens: float, loss_scale: float) -> None:
    if not n_tokens >= 1:
        raise ValueError(f"the window's token count N must be >= 1, got {n_tokens!r}")
    if not loss_scale > 0:
        raise ValueError(f"the loss scale must be > 0, got {loss_scale!r}")


def fp16_status(value: float) -> str:
    """Where a non-negative value lands in fp16: "zero" (rounds to 0), "subnormal" (fewer
    than 11 significant bits left), "normal", or "overflow" (becomes inf)."""
    stored = float(torch.tensor(value, dtype=torch.float64).to(torch.float16))
    if stored == 0.0 and value != 0.0:
        return "zero"
    if stored == float("inf"):
        return "overflow"
    return "subnormal" if stored < FP16.smallest_normal else "normal"


def fp16_term(p: float, n_tokens: float, loss_scale: float = 1.0) -> dict:
    """The gradient term p / N of one wrong-token logit, as fp16 holds it under a loss scale S.

    Returns the exact term, the scaled value S·p/N, what fp16 stores for it, the term recovered
    after dividing by S (as `unscale_` does, in float32), its relative error (1 for a zero)
    and the fp16 `status` of the scaled value.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability must be in [0, 1], got {p!r}")
    _check(n_tokens, loss_scale)
    exact = p / n_tokens
    scaled = exact * loss_scale
    stored = float(torch.tensor(scaled, dtype=torch.float64).to(torch.float16))
    recovered = stored / loss_scale
    error = abs(recovered - exact) / exact if exact else 0.0
    return {"p": p, "n_tokens": n_tokens, "loss_scale": loss_scale, "exact": exact,
            "scaled": scaled, "stored": stored, "recovered": recovered,
            "rel_error": error, "status": fp16_status(scaled)}


def zero_share(probs: torch.Tensor, n_tokens: float, loss_scale: float = 1.0) -> float:
    """Fraction of the non-zero entries of `probs` whose term S·p/N is 0 in fp16."""
    _check(n_tokens, loss_scale)
    values = _positive(probs)
    stored = (values * (loss_scale / n_tokens)).to(torch.float16)
    return float((stored == 0).double().mean())


def _positive(probs: torch.Tensor) -> torch.Tensor:
    values = probs.detach().double().flatten()
    values = values[values > 0]
    if values.numel() == 0:
        raise ValueError("no positive probabilities given")
    return values


class ZeroShares:
    """`zero_share` for many (N, S) on the same probabilities, each answered in microseconds:
    the probabilities are sorted once, and a term rounds to 0 exactly when S·p/N ≤ 2**-25
    (half the smallest subnormal; the tie rounds to the even neighbour, 0)."""

    def __init__(self, probs: torch.Tensor):
        self.sorted = torch.sort(_positive(probs)).values

    def __call__(self, n_tokens: float, loss_scale: float = 1.0) -> float:
        _check(n_tokens, loss_scale)
        limit = torch.tensor([SMALLEST_SUBNORMAL / 2 * n_tokens / loss_scale],
                             dtype=torch.float64)
        return int(torch.searchsorted(self.sorted, limit, right=True)) / len(self.sorted)


__all__ = ["SMALLEST_SUBNORMAL", "ZeroShares", "fp16_status", "fp16_term", "zero_share"]
