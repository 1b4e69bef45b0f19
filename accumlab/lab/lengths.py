"""Variable-length sequences: padding vs packing, mean-of-means error, counts across ranks.

The numbers behind notebook 05: how much of a padded micro-batch is padding, what packing
saves, how far "mean loss / k" drifts from the exact token-weighted window gradient as the
length distribution gets more skewed, and why the token count must be summed over
data-parallel ranks.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.gradients import gradient_vector, relative_difference
from accumlab.engine.losses import IGNORE_INDEX, count_items, summed_loss
from accumlab.engine.window import default_forward
from accumlab.lab.equivalence import split_evenly, window_gradient


def skewed_sample(examples: Sequence[dict], skew: float, n: int) -> list[dict]:
    """`n` examples sorted by length whose spread grows with `skew` in [0, 1].

    skew=0 takes n examples around the median length (near-equal counts); skew=1 spreads them
    from the shortest to the longest. Sorting by length is what a length-grouped sampler does,
    so consecutive micro-batches hold very different token counts.
    """
    if not 0.0 <= skew <= 1.0:
        raise ValueError(f"skew must be in [0, 1], got {skew}")
    ranked = sorted(examples, key=lambda e: len(e["input_ids"]))
    last = len(ranked) - 1
    picks = []
    for i in range(n):
        u = i / (n - 1) if n > 1 else 0.5
        q = 0.5 + skew * (u - 0.5)
        picks.append(ranked[round(q * last)])
    if skew == 0.0:  # n copies of the median would be one example; take its neighbours
        mid = last // 2
        lo = max(0, min(mid - n // 2, len(ranked) - n))
        picks = ranked[lo:lo + n]
    return picks


def item_counts(examples: Sequence[dict], k: int, task: str = "causal_lm") -> list[int]:
    """Label tokens of each of the k micro-batches that `split_evenly` makes."""
    return [count_items(pad_collate(c)["labels"], task) for c in split_evenly(examples, k)]


def mean_of_means_error(model: torch.nn.Module, examples: Sequence[dict], k: int,
                        task: str = "causal_lm", pad_token_id: int = 0) -> float:
    """Relative difference of the mean-of-means window gradient from the exact one (float64)."""
    common = dict(task=task, precision="fp64", pad_token_id=pad_token_id)
    exact = window_gradient(model, examples, k, normalization="tokens", **common)
    mom = window_gradient(model, examples, k, normalization="mean_of_means", **common)
    return relative_difference(mom, exact)


def token_weights(counts: Sequence[int]) -> dict:
    """Weight of one token of each micro-batch: exact (1/N) vs mean of means (1/(k n_j))."""
    n, k = sum(counts), len(counts)
    return {"exact": [1 / n] * k, "mean_of_means": [1 / (k * c) if c else 0.0 for c in counts]}


def _rank_gradient(model, batches: Sequence[dict], divide_by: int, task: str) -> torch.Tensor:
    net = copy.deepcopy(model).double()
    net.zero_grad(set_to_none=True)
    for b in batches:
        (summed_loss(default_forward(net, b), b["labels"], task) / divide_by).backward()
    return gradient_vector(net)


def ranks_gradients(model: torch.nn.Module, rank_examples: Sequence[Sequence[dict]], k: int,
                    task: str = "causal_lm", pad_token_id: int = 0) -> dict:
    """Simulated data parallelism: each rank's window is its examples split into k micro-batches.

    Returns float64 gradient vectors: `single` (one batch of all ranks' examples), `global`
    (each rank divides its summed loss by the count summed over ranks, then DDP's average is
    undone by x R) and `local` (each rank divides by its own count, DDP averages), with the
    counts.
    """
    ranks = len(rank_examples)
    batches = [[pad_collate(c, pad_token_id) for c in split_evenly(ex, k)]
               for ex in rank_examples]
    local_counts = [sum(count_items(b["labels"], task) for b in bs) for bs in batches]
    total = sum(local_counts)  # what an all_reduce(SUM) of the local counts gives
    every = [e for ex in rank_examples for e in ex]
    single = window_gradient(model, every, 1, task=task, precision="fp64",
                             pad_token_id=pad_token_id)
    per_rank_global = [_rank_gradient(model, bs, total, task) * ranks for bs in batches]
    per_rank_local = [_rank_gradient(model, bs, n, task) for bs, n in zip(batches, local_counts)]
    average = lambda grads: torch.stack(grads).mean(dim=0)  # noqa: E731  (DDP's all-reduce mean)
    return {"single": single, "global": average(per_rank_global),
            "local": average(per_rank_local), "local_counts": local_counts, "total": total}


def masked_fraction(examples: Sequence[dict]) -> float:
    """Fraction of label positions that carry IGNORE_INDEX (prompt masking, padding)."""
    labels = [t for e in examples for t in e["labels"]]
    return sum(t == IGNORE_INDEX for t in labels) / max(len(labels), 1)
