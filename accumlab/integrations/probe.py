"""Does a model's own loss honour `num_items_in_batch`? One forward tells.

Hugging Face's Trainer passes the window's item count to any model whose `forward` takes
`**kwargs`, and then skips its division by the accumulation steps, trusting the model to have
divided by that count. Several heads take `**kwargs` and drop it (BERT's classification and
masked-LM heads, huggingface/transformers#47688): their loss is a plain micro-batch mean, so
the plain Trainer's update becomes the *sum* of the k micro-batch means, about k times the
exact one. `loss_ignores_item_count` finds out by asking the model for its loss with a count
that is twice the true one: a model that honours it returns half its mean loss.
"""

from __future__ import annotations

import inspect

import torch

from accumlab.engine.losses import count_items, summed_loss


class ItemCountIgnoredWarning(UserWarning):
    """The model's own loss ignores `num_items_in_batch` (the plain Trainer would be off by ~k)."""


def takes_loss_kwargs(model: torch.nn.Module) -> bool:
    """What the Trainer believes: `model.accepts_loss_kwargs`, else whether forward takes **kwargs."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def loss_ignores_item_count(model: torch.nn.Module, batch: dict, task: str) -> bool | None:
    """True if `model(**batch, num_items_in_batch=N).loss` ignores N; None if it can't be told.

    Runs one forward without gradients on `batch` (which must hold `labels`), passing twice the
    batch's own item count. A model that divides by N returns sum / 2n, half the mean; one that
    ignores N returns the mean. The sum is computed from the same forward's logits, so dropout
    does not blur the answer. None when the forward does not take loss kwargs (the Trainer
    then never passes N, and divides by the accumulation steps itself) or the batch holds no
    labelled item.
    """
    if not takes_loss_kwargs(model):
        return None
    labels = batch["labels"]
    n = count_items(labels, task)
    if n == 0:
        return None
    cuda = sorted({t.device.index or 0 for t in batch.values()
                   if torch.is_tensor(t) and t.device.type == "cuda"})
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):  # dropout draws left as they were
        out = model(**batch, num_items_in_batch=2 * n)
        if getattr(out, "loss", None) is None:
            return None
        half_mean = summed_loss(out.logits, labels, task) / (2 * n)
        theirs = out.loss.to(half_mean.dtype)
    # honoured: theirs == half_mean; ignored: theirs == 2 x half_mean. Midpoint: 1.5 x.
    return bool((theirs - half_mean).abs() > 0.5 * half_mean.abs())
