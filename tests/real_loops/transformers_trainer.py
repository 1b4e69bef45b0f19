"""The Hugging Face Trainer's accumulation, with a stock GPT-2.

Repository huggingface/transformers, file src/transformers/trainer.py, release v5.24.0 (the
installed wheel; the repository is too large to fetch here, so no commit hash):
`Trainer.__init__` (`_loss_shifts_labels`), `_inner_training_loop` (the window loop and its
sync step), `_get_num_items_in_batch`, `training_step` and `compute_loss`.

Per window: the `num_batches` micro-batches are fetched first and `num_items_in_batch` counts
`labels[..., 1:] != -100` only if `LOSS_MAPPING.get(model.loss_type) is ForCausalLMLoss`, else
`labels != -100`. Each micro-batch: `model(**inputs, num_items_in_batch=N).loss` (GPT-2's
forward takes **kwargs, so `model_accepts_loss_kwargs` and the loss is a sum over N, not
divided by the accumulation steps), `accelerator.backward(loss)`. On the last micro-batch:
clip to `max_grad_norm`, `optimizer.step()`, `lr_scheduler.step()`, `model.zero_grad()`. A
short last window is stepped with its own N.

Expected: a stock GPT2LMHeadModel has `loss_type` None, so N also counts each row's first
label, which no position predicts: every update is N_shifted/N_unshifted of the exact one
(16/18 = 0.89 on rows of 9 tokens): wrong_scale, with that cause. Everything else is right.
"""

import torch
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

EXPECTED = ["wrong_scale"]
OTHER = []
MEASURE = {"equal": "unshifted", "unequal": "exact", "partial": "unshifted"}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    loss_shifts_labels = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    labels_for_count = [b["labels"][..., 1:] if loss_shifts_labels else b["labels"]
                        for b in micro_batches]
    num_items_in_batch = sum(labels.ne(-100).sum() for labels in labels_for_count)
    for i, inputs in enumerate(micro_batches):
        model.train()
        loss = model(**inputs, num_items_in_batch=num_items_in_batch).loss
        loss.backward()  # loss_is_scaled_for_ga: no division by the accumulation steps
        if i == len(micro_batches) - 1:  # do_sync_step
            if max_grad_norm is not None and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            model.zero_grad()
