"""fairseq's `Trainer.train_step` with `--update-freq`, for language modelling.

Repository facebookresearch/fairseq, commit 3d262bb25690e4eb2e7d3c1309b1e9c406ca4b99: files
fairseq/trainer.py (`train_step`), fairseq/tasks/fairseq_task.py (`train_step`),
fairseq/criterions/cross_entropy.py (sum of token NLL, `sample_size = ntokens`),
fairseq/optim/fairseq_optimizer.py (`multiply_grads`, `clip_grad_norm`) and fairseq/utils.py
(`clip_grad_norm_`, `log_softmax`).

`train_step(samples)` gets the `update_freq` micro-batches of one update (the last group of
an epoch may be shorter): `zero_grad()`; for each, the criterion's summed NLL over target
tokens is backpropagated and `sample_size += ntokens`; then `multiply_grads(world_size /
sample_size)`, `clip_grad_norm(clip_norm)` — which always computes the norm, as
`torch.norm(g, p=2, dtype=torch.float32)` per gradient, and clips only if clip_norm > 0 —
`optimizer.step()`, and `set_num_updates` steps the LR scheduler once.

Expected: exact at every window length. The float32 norm raises on float64 gradients
("the dtype of the input (Double) should be convertible without narrowing"), so the doctor
retries in float32 and says so (a note).
"""

import torch
import torch.nn.functional as F

EXPECTED = []
OTHER = ["probed_in_float32"]
MEASURE = {"equal": 1.0, "unequal": "exact", "partial": 1.0}
PRECISION = "float32"


def clip_grad_norm_(params, max_norm):  # fairseq.utils.clip_grad_norm_, one device
    grads = [p.grad.detach() for p in params if p.grad is not None]
    total_norm = torch.norm(torch.stack([torch.norm(g, p=2, dtype=torch.float32)
                                         for g in grads]))
    if max_norm > 0:
        clip_coef = (float(max_norm) / (total_norm + 1e-6)).clamp_(max=1)
        torch._foreach_mul_(grads, clip_coef)
    return total_norm


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    model.train()
    optimizer.zero_grad()
    sample_size = 0
    for sample in micro_batches:
        logits = model(input_ids=sample["input_ids"],
                       attention_mask=sample["attention_mask"]).logits[:, :-1]
        target = sample["labels"][:, 1:]  # fairseq's LM target: the next token
        lprobs = F.log_softmax(logits.float(), dim=-1)  # utils.log_softmax upcasts
        loss = F.nll_loss(lprobs.reshape(-1, lprobs.shape[-1]), target.reshape(-1),
                          ignore_index=-100, reduction="sum")
        loss.backward()  # optimizer.backward(loss)
        sample_size += int((target != -100).sum())  # ntokens
    numer = 1  # data_parallel_world_size
    for p in model.parameters():  # optimizer.multiply_grads(numer / (sample_size or 1.0))
        if p.grad is not None:
            p.grad.data.mul_(numer / (float(sample_size) or 1.0))
    clip_grad_norm_(list(model.parameters()), max_grad_norm or 0.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()  # lr_step_update
