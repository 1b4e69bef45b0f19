"""nanoGPT before the loss was divided by the accumulation steps.

Repository karpathy/nanoGPT, file train.py, commit a82b33b525ca9855d705656387698e13eb8e8d4b
(the parent of 553f949f, "fix minor bug where we have to scale the loss to account for
gradient accumulation, which sums before backprop"), the `while True:` training loop.

Per iteration: `gradient_accumulation_steps` micro-steps of `logits, loss = model(X, Y)` and
`scaler.scale(loss).backward()`, the mean loss undivided; then, if `grad_clip != 0`,
`scaler.unscale_(optimizer)` and `clip_grad_norm_`; `scaler.step`, `scaler.update`,
`optimizer.zero_grad(set_to_none=True)`. The log prints `loss.item()`, the last micro-batch's.
(The learning rate is set from get_lr(iter) before the window; here it is the probe's.)

Expected: the update is k times the exact one (loss_not_scaled), and its direction is the mean
of the micro-batch means, so with unequal token counts also mean_of_means (nanoGPT's
micro-batches all hold batch_size x block_size tokens, where that is exact; the probe pads).
The logged loss is the last micro-batch's (a warning). nanoGPT samples batches forever and
never has a partial window; the partial probe is moot while the length is tied to k.
"""

import torch

EXPECTED = ["loss_not_scaled", "mean_of_means"]
OTHER = ["logged_loss_wrong"]
MEASURE = {"equal": "k", "unequal": "mean_of_means", "partial": None}


def window(model, optimizer, micro_batches, accum_steps, *, scaler=None, max_grad_norm=None):
    grad_clip = max_grad_norm or 0.0
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)  # enabled only for float16
    for batch in micro_batches:  # for micro_step in range(gradient_accumulation_steps)
        loss = model(**batch).loss
        scaler.scale(loss).backward()
    if grad_clip != 0.0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()  # lossf
