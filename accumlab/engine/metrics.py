"""Evaluation metrics from plain predictions and labels."""

from __future__ import annotations

import math
from collections.abc import Sequence


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to the labels."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs equally many predictions and labels, at least one")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int | None = None
             ) -> float:
    """F1 averaged over classes with equal weight (a class never seen nor predicted is left out)."""
    if len(predictions) != len(labels) or not labels:
        raise ValueError("macro_f1 needs equally many predictions and labels, at least one")
    classes = range(num_classes) if num_classes else sorted(set(labels) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(1 for p, y in zip(predictions, labels) if p == c and y == c)
        fp = sum(1 for p, y in zip(predictions, labels) if p == c and y != c)
        fn = sum(1 for p, y in zip(predictions, labels) if p != c and y == c)
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def perplexity(mean_loss: float) -> float:
    """exp of a mean token cross-entropy (inf when it overflows)."""
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf


HIGHER_IS_BETTER = {"loss": False, "perplexity": False, "accuracy": True, "f1": True}
