"""nanoGPT's training loop as it stands.

Repository karpathy/nanoGPT, file train.py, commit 3adf61e154c3fe3fca428ad6bc3818b27a3b8291,
the "forward backward update" block of the `while True:` loop.

Per iteration: `gradient_accumulation_steps` micro-steps of forward,
`loss = loss / gradient_accumulation_steps` and `scaler.scale(loss).backward()`; then, if
`grad_clip != 0`, `scaler.unscale_` and `clip_grad_norm_`; `scaler.step`, `scaler.update`,
`zero_grad(set_to_none=True)`. The log shows `loss.item() * gradient_accumulation_steps`.

Expected: mean of means (exact in nanoGPT, whose micro-batches hold equal token counts, but not
on padded variable-length data); a window shorter than k would be divided by k
(partial_window_scaled_by_k) — nanoGPT itself never has one, it samples batches forever, so
that verdict is about the arithmetic carried to epoch-based data. The logged loss is the last
micro-batch's times k (a warning; "deliberate", avoiding syncs).
"""

import torch

EXPECTED = ["mean_of_means", "partial_window_scaled_by_k"]
OTHER = ["logged_loss_wrong"]
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": "m/k"}


def window(model, optimizer, micro_batches, accum_steps, *, scaler=None, max_grad_norm=None):
    gradient_accumulation_steps, grad_clip = accum_steps, max_grad_norm or 0.0
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    for batch in micro_batches:
        loss = model(**batch).loss
        loss = loss / gradient_accumulation_steps
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item() * gradient_accumulation_steps  # lossf
