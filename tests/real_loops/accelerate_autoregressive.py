"""Accelerate's recipe for token-normalised accumulation of causal language models.

Repository huggingface/accelerate, file examples/by_feature/
gradient_accumulation_for_autoregressive_models.py, commit
16cb6eb80dd9aa8b4df1a63ef57863e455d53b83, `training_function`; `Accelerator.backward` from
src/accelerate/accelerator.py at the same commit.

Per update step: the window's micro-batches are fetched first; `num_items_in_batch =
sum(batch["labels"].ne(-100).sum())`, gathered over processes; each micro-batch:
`model(**batch, use_cache=False, num_items_in_batch=N).loss` (a token sum over N) times
`gradient_accumulation_steps * num_processes`, then `accelerator.backward(loss)`, which
divides by `gradient_accumulation_steps` again; after the window `accelerator.clip_grad_norm_`,
`optimizer.step()`, `lr_scheduler.step()`, `optimizer.zero_grad()`. The last update step of an
epoch takes the remainder of micro-batches, with its own N (and the same x k / k).

Expected: the example's collate_fn already shifts (`labels = input_ids[:, 1:]`) and the model's
loss shifts again, so the loss averages over one label fewer per row than N counts; here the
labels reach the model unshifted, and counting `labels.ne(-100)` gives the same over-count of
one label per row: wrong_scale (the first label of every row). The double shift itself (the
example trains on the token after next) is outside what a window check can see.
"""

import torch

EXPECTED = ["wrong_scale"]
OTHER = []
MEASURE = {"equal": "unshifted", "unequal": "exact", "partial": "unshifted"}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    gradient_accumulation_steps, num_processes = accum_steps, 1
    num_items_in_batch = sum([(batch["labels"].ne(-100)).sum() for batch in micro_batches])
    for batch in micro_batches:
        loss = model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        loss = loss * gradient_accumulation_steps * num_processes
        (loss / gradient_accumulation_steps).backward()  # accelerator.backward
    if max_grad_norm is not None:  # accelerator.clip_grad_norm_(model.parameters(), ...)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()
