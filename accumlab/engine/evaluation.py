"""Evaluation: token loss and perplexity for language models, accuracy and F1 for classifiers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.losses import count_items, per_item_losses
from accumlab.engine.metrics import accuracy, macro_f1, perplexity


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Sequence, *, task: str, batch_size: int = 32,
    device: torch.device | str | None = None, pad_token_id: int = 0, collate=None,
    loss_chunk_size: int | None = None,
) -> dict:
    """Metrics of `model` on `data` (same format as training data), averaged over all items.

    Language models: `loss` (mean token cross-entropy) and `perplexity`. Classifiers: `loss`,
    `accuracy` and macro `f1`. The model is put back in its previous train/eval mode.
    `collate(examples)` makes a batch (default: pad to the longest).
    """
    if len(data) == 0:
        raise ValueError("eval data is empty")
    collate = collate or (lambda examples: pad_collate(examples, pad_token_id))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_items = 0.0, 0
    predictions: list[int] = []
    labels_seen: list[int] = []
    try:
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            labels = batch["labels"]
            total_loss += float(per_item_losses(logits, labels, task, loss_chunk_size).sum())
            total_items += count_items(labels, task)
            if task == "classification":
                predictions += logits.argmax(dim=-1).tolist()
                labels_seen += labels.tolist()
    finally:
        model.train(was_training)
    if total_items == 0:
        raise ValueError("every label in the eval data is -100: nothing to evaluate")
    loss = total_loss / total_items
    if task == "classification":
        return {"loss": loss, "accuracy": accuracy(predictions, labels_seen),
                "f1": macro_f1(predictions, labels_seen)}
    return {"loss": loss, "perplexity": perplexity(loss)}
