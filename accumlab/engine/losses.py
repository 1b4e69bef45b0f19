"""Losses computed from logits with sum reduction, so that accumulation can divide by a global count.

A `transformers` model averages its own loss in ways that differ by model (BERT heads ignore
`num_items_in_batch`, causal-LM losses upcast float64 logits to float32). accumlab never uses
`outputs.loss`: it takes `outputs.logits` and sums the per-item losses itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from accumlab.engine.config import TASKS

IGNORE_INDEX = -100


def detect_task(model: torch.nn.Module) -> str:
    """Guess the task of a model from its class name: causal_lm, masked_lm or classification."""
    module = getattr(model, "module", model)  # DDP
    module = getattr(module, "_orig_mod", module)  # torch.compile
    name = type(module).__name__
    if "SequenceClassification" in name or name.endswith("Classifier"):
        return "classification"
    if "MaskedLM" in name or "ForPreTraining" in name:
        return "masked_lm"
    if "CausalLM" in name or "LMHead" in name:
        return "causal_lm"
    task = getattr(module, "accumlab_task", None)
    if task in TASKS:
        return task
    raise ValueError(
        f"cannot tell the task of a {name}: pass task='causal_lm', 'masked_lm' or "
        "'classification' (TrainConfig.task), or set model.accumlab_task"
    )


def aligned_labels(labels: torch.Tensor, task: str) -> torch.Tensor:
    """Labels lined up with the positions that predict them (causal LM shifts by one)."""
    if task == "causal_lm":
        return labels[..., 1:]
    return labels


def count_items(labels: torch.Tensor, task: str, normalization: str = "tokens") -> int:
    """Loss-bearing items in a micro-batch: label tokens after the shift, or sequences/examples.

    For `samples` normalisation of a language model an item is a sequence with at least one
    label; for classification every labelled example is one item in every mode.
    """
    valid = aligned_labels(labels, task) != IGNORE_INDEX
    if normalization == "samples" and task != "classification":
        return int(valid.reshape(valid.shape[0], -1).any(dim=1).sum())
    return int(valid.sum())


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _row_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each position of a [batch, positions, vocab] (or [batch, classes]) block."""
    upcast = logits.to(_compute_dtype(logits))
    flat = F.cross_entropy(upcast.reshape(-1, upcast.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="none")
    return flat.reshape(labels.shape)


def per_item_losses(logits: torch.Tensor, labels: torch.Tensor, task: str,
                    chunk_size: int | None = None) -> torch.Tensor:
    """Cross-entropy of every position (zero where the label is -100), shaped like the labels.

    With `chunk_size` (positions per chunk, summed over the batch) a sequence task's loss is
    computed chunk by chunk under activation checkpointing: autograd keeps only the model's own
    logits, and the float32 copy and its softmax exist for one chunk at a time, in the forward
    and again in the backward. Every position's loss and gradient are the same numbers as
    without chunks (cross-entropy is computed row by row), so the window contract is unchanged.
    """
    labels = aligned_labels(labels, task).to(logits.device)
    if task == "causal_lm":
        logits = logits[..., :-1, :]  # a view: the shift copies nothing
    if chunk_size is None or task == "classification" or logits.dim() != 3:
        return _row_losses(logits, labels)
    if chunk_size < 1:
        raise ValueError(f"loss chunk_size must be >= 1 position or None, got {chunk_size}")
    positions = max(1, chunk_size // max(1, logits.shape[0]))
    if positions >= logits.shape[1] and logits.dtype == _compute_dtype(logits):
        return _row_losses(logits, labels)  # one chunk, no upcast: nothing to save
    pieces = zip(logits.split(positions, dim=1), labels.split(positions, dim=1))
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return torch.cat([_row_losses(x, y) for x, y in pieces], dim=1)
    return torch.cat([checkpoint(_row_losses, x, y, use_reentrant=False) for x, y in pieces],
                     dim=1)


def summed_loss(
    logits: torch.Tensor, labels: torch.Tensor, task: str, normalization: str = "tokens",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum of item losses in one micro-batch (per-sequence means summed, for `samples` LM).

    Dividing this by the window's item count gives the micro-batch's share of L_W.
    """
    losses = per_item_losses(logits, labels, task, chunk_size)
    if normalization == "samples" and task != "classification":
        valid = aligned_labels(labels, task).to(losses.device) != IGNORE_INDEX
        per_seq_tokens = valid.reshape(valid.shape[0], -1).sum(dim=1)
        per_seq_sum = losses.reshape(losses.shape[0], -1).sum(dim=1)
        return (per_seq_sum / per_seq_tokens.clamp(min=1)).sum()
    return losses.sum()


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """Mean item loss of one batch (the loss a plain, non-accumulating step would use)."""
    n = count_items(labels, task)
    if n == 0:
        raise ValueError("every label in this batch is -100: there is no loss to average")
    return summed_loss(logits, labels, task) / n
