"""torchtune's single-device full fine-tuning recipe.

Repository pytorch/torchtune, commit bd2a0fc7c31430972728494fa01aaeeb0ebf1ba1: file
recipes/full_finetune_single_device.py (`setup`: `_steps_per_epoch = len(dataloader) //
gradient_accumulation_steps`; `train` and `_loss_step`), torchtune/training/_grad_scaler.py
(`scale_grads_`), and torchtune/datasets/_sft.py (labels shifted by one in the dataset, with
an ignored label appended, since PR #2613).

Per batch: `current_num_tokens = (labels != ignore_index).sum()`, `current_loss =
loss_fn(model(tokens), labels) * current_num_tokens` (a mean loss times its tokens: the token
sum), `backward()`. Every `gradient_accumulation_steps` batches: `scale_grads_(params, 1 /
num_tokens)`, clip if `clip_grad_norm`, `optimizer.step()`, `zero_grad(set_to_none=True)`,
`lr_scheduler.step()`. The epoch loop runs `while inner_step_count < _steps_per_epoch`, so the
last `len % k` batches are never fetched.

Expected: exact (token sums over the window's token count); the short tail is dropped, a policy
(partial_window_dropped, a note) that costs up to k-1 micro-batches of data per epoch.
"""

import torch
import torch.nn.functional as F

EXPECTED = []
OTHER = ["partial_window_dropped"]
MEASURE = {"equal": 1.0, "unequal": "exact", "partial": "dropped"}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    if len(micro_batches) < accum_steps:  # inner_step_count reached _steps_per_epoch
        return None
    running_loss, num_tokens = 0.0, 0
    for batch_count, batch in enumerate(micro_batches):
        ignore = torch.full_like(batch["labels"][:, :1], -100)
        labels = torch.cat([batch["labels"][:, 1:], ignore], dim=1)  # shifted in the dataset
        current_num_tokens = (labels != -100).sum()
        num_tokens += current_num_tokens
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                               ignore_index=-100)  # the recipe's loss_fn: mean over tokens
        current_loss = loss * current_num_tokens
        running_loss += current_loss.detach()
        current_loss.backward()
        if (batch_count + 1) % accum_steps == 0:
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, (1.0 / num_tokens).to(grads[0].device))  # scale_grads_
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(max_grad_norm))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scheduler is not None:
                scheduler.step()
    return (running_loss / num_tokens).item()
