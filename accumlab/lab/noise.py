"""The true gradient noise scale B_simple = tr(Σ) / |G|², to validate the live estimate.

The two-batch estimator itself, and the math behind it (McCandlish et al. 2018,
arXiv:1812.06162, appendix A.1), are in `accumlab.engine.noise`. This module computes the
truth from per-example gradients (`exact_noise_scale`) and the (small, big) pairs the estimator
takes from one accumulated window (`window_noise_pair`), on a small problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from accumlab.engine.collate import pad_collate
from accumlab.engine.losses import count_items, summed_loss
from accumlab.engine.window import Accumulator, default_forward


class BagOfWordsClassifier(torch.nn.Module):
    """Logistic regression (no intercept) on mean bag-of-words features, for validation.

    Called like a `transformers` classifier (`model(input_ids=..., attention_mask=...)`
    returns an object with `.logits`), so accumlab trains and accumulates it like any model.
    Without an intercept no single direction dominates the gradient noise, which keeps the
    two-batch estimate's variance low.
    """

    accumlab_task = "classification"

    def __init__(self, vocab_size: int, num_labels: int, seed: int | None = 0,
                 init_std: float = 0.1):
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.bag = torch.nn.EmbeddingBag(vocab_size, num_labels, mode="sum")
        torch.nn.init.normal_(self.bag.weight, std=init_std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Logits = mean over the unmasked tokens of their weight rows."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        weights = mask.to(self.bag.weight.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
        return SequenceClassifierOutput(logits=self.bag(input_ids, per_sample_weights=weights))


def squared_grad_norm(parameters: Sequence[torch.nn.Parameter]) -> float:
    """|g|² of the `.grad` of `parameters` (None counts as zero), summed in float64."""
    return float(sum(p.grad.detach().double().pow(2).sum() for p in parameters
                     if p.grad is not None))


def window_noise_pair(model: torch.nn.Module, micro_batches: Sequence[dict], *, task: str,
                      forward: Callable | None = None) -> dict:
    """Accumulate one window and return the pair `NoiseScale.update` takes.

    Runs the window with accumlab's `Accumulator` (token/example normalisation): after the
    first micro-batch the `.grad` holds its item-loss sum / N, so its mean gradient is that
    times N / n_1 (the small batch); after the last it is the window's mean gradient (the big
    batch). Gradients are left in `.grad`, added to what was there (zero them first).
    """
    forward = forward or default_forward
    params = [p for p in model.parameters() if p.requires_grad]
    acc = Accumulator(model, None, len(micro_batches), task=task)
    (window,) = list(acc.windows(micro_batches))
    small_sq = math.nan
    for j, batch in enumerate(window):
        window.backward(window.loss(forward(model, batch), batch["labels"]))
        if j == 0:
            scale = window.n_items / window.item_counts[0]
            small_sq = squared_grad_norm(params) * scale**2
    return {"small_sq": small_sq, "small_items": window.item_counts[0],
            "big_sq": squared_grad_norm(params), "big_items": window.n_items}


def per_example_gradients(model: torch.nn.Module, examples: Sequence[dict], *, task: str,
                          forward: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's summed-loss gradient (float64, one row per example) and its item count.

    For classification an example has one item; for a language model its label tokens.
    """
    forward = forward or default_forward
    params = [p for p in model.parameters() if p.requires_grad]
    rows, counts = [], []
    for example in examples:
        batch = pad_collate([example])
        loss = summed_loss(forward(model, batch), batch["labels"], task)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).double().flatten()
                               for g, p in zip(grads, params, strict=True)]))
        counts.append(count_items(batch["labels"], task))
    return torch.stack(rows), torch.tensor(counts, dtype=torch.float64)


def exact_noise_scale(model: torch.nn.Module, examples: Sequence[dict], *,
                      task: str = "classification", forward: Callable | None = None) -> dict:
    """The true |G|², tr(Σ) and B_simple of `model` on `examples`, from per-example gradients.

    Items are examples (use a classification model: every example is one item): G is the mean
    of the per-example gradients g_i and tr(Σ) = mean |g_i − G|², the per-item covariance of
    sampling one example uniformly (with replacement). Dropout must be off.
    """
    grads, counts = per_example_gradients(model, examples, task=task, forward=forward)
    if not torch.all(counts == 1):
        raise ValueError("exact_noise_scale treats every example as one item; use a "
                         "classification model (or examples with one label token each)")
    mean = grads.mean(dim=0)
    grad_sq = float(mean.pow(2).sum())
    trace = float((grads - mean).pow(2).sum(dim=1).mean())
    return {"noise_scale": trace / grad_sq, "grad_sq": grad_sq, "trace_sigma": trace,
            "items": len(examples)}


def sequence_noise_scale(model: torch.nn.Module, examples: Sequence[dict], *,
                         task: str = "causal_lm", forward: Callable | None = None) -> dict:
    """B_simple in tokens of a language model at its current weights, from per-sequence gradients.

    Batches are drawn as whole sequences, so the sampled unit is a sequence: s_i its summed-loss
    gradient, n_i its label tokens. A batch's mean gradient is Σ s_i / Σ n_i, whose variance over
    batches of S sequences is v / S with v = mean |s_i − n_i G|² / n̄²; so E|G_B|² = |G|² +
    v n̄ / B for a batch of B = S n̄ tokens, and tr Σ (per token) = v n̄ is what the trainer's
    two-batch estimate measures. |G|² is corrected for the sample's own noise (minus v / S).
    Sums are streamed, one sequence at a time, so memory stays at two gradient copies.
    Returns {"noise_scale" (tokens), "grad_sq", "trace_sigma", "sequences", "mean_tokens"}.
    """
    forward = forward or default_forward
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]  # Σ s_i
    weighted = [torch.zeros_like(p, dtype=torch.float64) for p in params]  # Σ n_i s_i
    square, items, items_sq = 0.0, 0.0, 0.0  # Σ |s_i|², Σ n_i, Σ n_i²
    for example in examples:
        batch = pad_collate([example])
        n = float(count_items(batch["labels"], task))
        loss = summed_loss(forward(model, batch), batch["labels"], task)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for t, w, g in zip(total, weighted, grads, strict=True):
            if g is not None:
                g = g.double()
                t.add_(g)
                w.add_(g, alpha=n)
                square += float(g.pow(2).sum())
        items, items_sq = items + n, items_sq + n * n
    sequences = len(examples)
    if sequences < 2 or items == 0:
        raise ValueError(f"need at least 2 sequences with label tokens, got {sequences}")
    mean_tokens = items / sequences
    mean = [t / items for t in total]  # G
    cross = sum(float((g * w).sum()) for g, w in zip(mean, weighted, strict=True))
    grad_sq_sample = sum(float(g.pow(2).sum()) for g in mean)
    spread = square - 2 * cross + grad_sq_sample * items_sq  # Σ |s_i − n_i G|²
    v = spread / (sequences - 1) / mean_tokens**2
    grad_sq = grad_sq_sample - v / sequences
    trace = v * mean_tokens
    return {"noise_scale": trace / grad_sq if grad_sq > 0 else math.nan, "grad_sq": grad_sq,
            "trace_sigma": trace, "sequences": sequences, "mean_tokens": mean_tokens}


class NoiseProbe:
    """A training callback that measures `sequence_noise_scale` on fixed `examples` before the
    first step, after each step in `steps`, and after the last step.

    `points` holds {"step", "loss" (the training loss of that step; None at step 0),
    "noise_scale", ...}: the yardstick for the trainer's live two-batch estimate.
    """

    def __init__(self, examples: Sequence[dict], steps: Sequence[int] = (),
                 task: str = "causal_lm"):
        self.examples, self.steps, self.task = list(examples), set(steps), task
        self.points: list[dict] = []
        self.model: torch.nn.Module | None = None
        self._last: dict | None = None

    def _measure(self, step: int, loss: float | None) -> None:
        if self.points and self.points[-1]["step"] == step:
            return
        point = sequence_noise_scale(self.model, self.examples, task=self.task)
        self.points.append({"step": step, "loss": loss, **point})

    def on_train_begin(self, info: dict) -> None:
        self.model = info["model"]
        self._measure(0, None)

    def on_step_end(self, entry: dict) -> None:
        self._last = entry
        if entry["step"] in self.steps:
            self._measure(entry["step"], entry["loss"])

    def on_train_end(self, result) -> None:
        if self._last is not None:
            self._measure(self._last["step"], self._last["loss"])


__all__ = ["BagOfWordsClassifier", "NoiseProbe", "exact_noise_scale", "per_example_gradients",
           "sequence_noise_scale", "squared_grad_norm", "window_noise_pair"]
