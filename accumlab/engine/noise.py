"""The live gradient noise scale B_simple = tr(Σ) / |G|² (McCandlish et al. 2018, arXiv:1812.06162).

G is the true (full-data) mean gradient and Σ the per-item covariance of the gradient, so a
batch of B items gives a mean gradient G_B with E|G_B|² = |G|² + tr(Σ)/B. Two batch sizes give
two equations and hence unbiased estimates of both unknowns (the paper's appendix A.1):

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

Accumulation has both sizes for free: one micro-batch (small) and the whole window (big).
`NoiseScale` smooths the two estimates with separate moving averages and returns their ratio,
as the paper does. The trainer feeds it when `TrainConfig(noise_scale=True)`;
`accumlab.lab.noise.exact_noise_scale` validates it against per-example gradients.
"""

from __future__ import annotations

import math


def two_batch_estimate(small_sq: float, small_items: float, big_sq: float,
                       big_items: float) -> tuple[float, float]:
    """Unbiased (|G|², tr Σ) from the squared norms of two mean gradients of different sizes.

    `small_sq` = |G_small|² of a mean gradient over `small_items` items, `big_sq` likewise over
    `big_items` > `small_items` items. Either estimate may come out negative for one pair: only
    averages over many pairs are meaningful.
    """
    if not small_items > 0 or not big_items > small_items:
        raise ValueError(f"need 0 < small_items < big_items, got small_items={small_items}, "
                         f"big_items={big_items}: the window must hold more items than one "
                         "micro-batch (accum_steps > 1)")
    grad_sq = (big_items * big_sq - small_items * small_sq) / (big_items - small_items)
    trace_sigma = (small_sq - big_sq) / (1.0 / small_items - 1.0 / big_items)
    return float(grad_sq), float(trace_sigma)


class _Average:
    """Bias-corrected exponential moving average (plain running mean when `decay` is None)."""

    def __init__(self, decay: float | None):
        self.decay = decay
        self.total = 0.0
        self.weight = 0.0

    def add(self, value: float) -> None:
        if self.decay is None:
            self.total += value
            self.weight += 1.0
        else:
            self.total = self.decay * self.total + (1.0 - self.decay) * value
            self.weight = self.decay * self.weight + (1.0 - self.decay)

    @property
    def value(self) -> float:
        return self.total / self.weight if self.weight > 0 else math.nan


class NoiseScale:
    """Running estimate of B_simple from (micro-batch, window) gradient pairs.

        est = NoiseScale(ema=0.95)
        out = est.update(small_sq=..., small_items=..., big_sq=..., big_items=...)
        out["noise_scale"], out["grad_sq"], out["trace_sigma"]

    The |G|² and tr(Σ) estimates are averaged separately (bias-corrected EMA with decay `ema`,
    or an equal-weight mean over all updates when `ema` is None) and their ratio is returned.
    The noise scale is NaN until a pair was seen and while the averaged |G|² or tr(Σ) is not
    positive; a pair that cannot be used (one micro-batch per window, no items) is skipped.
    """

    def __init__(self, ema: float | None = 0.95):
        if ema is not None and not 0.0 <= ema < 1.0:
            raise ValueError(f"ema must be in [0, 1) or None (plain mean), got {ema!r}")
        self.ema = ema
        self._grad_sq = _Average(ema)
        self._trace = _Average(ema)
        self.pairs = 0

    def update(self, *, small_sq: float, small_items: float, big_sq: float,
               big_items: float) -> dict:
        """Add one pair and return the current {"noise_scale", "grad_sq", "trace_sigma"}."""
        usable = (small_items > 0 and big_items > small_items
                  and math.isfinite(small_sq) and math.isfinite(big_sq))
        if usable:
            grad_sq, trace = two_batch_estimate(small_sq, small_items, big_sq, big_items)
            self._grad_sq.add(grad_sq)
            self._trace.add(trace)
            self.pairs += 1
        return self.state()

    def state(self) -> dict:
        """The current averaged estimates and their ratio (NaN until estimable)."""
        grad_sq, trace = self._grad_sq.value, self._trace.value
        ok = grad_sq > 0 and trace > 0  # False for NaN too
        return {"noise_scale": trace / grad_sq if ok else math.nan, "grad_sq": grad_sq,
                "trace_sigma": trace}

    def state_dict(self) -> dict:
        """The running sums, JSON-ready (saved in checkpoints so that a resumed run goes on)."""
        return {"ema": self.ema, "pairs": self.pairs,
                "grad_sq": [self._grad_sq.total, self._grad_sq.weight],
                "trace": [self._trace.total, self._trace.weight]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.ema, self.pairs = state["ema"], state["pairs"]
        self._grad_sq = _Average(self.ema)
        self._trace = _Average(self.ema)
        self._grad_sq.total, self._grad_sq.weight = state["grad_sq"]
        self._trace.total, self._trace.weight = state["trace"]

__all__ = ["NoiseScale", "two_batch_estimate"]
