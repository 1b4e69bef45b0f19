"""PET's training loop (pattern-exploiting training), the 2019 Transformers-example style.

Repository timoschick/pet, file pet/wrapper.py, commit
21d32de975a911bfa0261827c9bd23dc4f0e4aa2, `TransformerModelWrapper.train`.

`model.zero_grad()` once before training; per batch (`step` from 0 in each epoch):
`loss = loss / gradient_accumulation_steps` if > 1, `loss.backward()`, `tr_loss +=
loss.item()`; `if (step + 1) % gradient_accumulation_steps == 0:` `clip_grad_norm_(...,
max_grad_norm)`, `optimizer.step()`, `scheduler.step()`, `model.zero_grad()`. The schedule is
sized `len(train_dataloader) // gradient_accumulation_steps * num_train_epochs`.

Expected: mean of means, and an epoch's last batches, when fewer than k, are never stepped:
their gradients stay and are added to the next epoch's first window
(partial_window_not_stepped; the loop the pet #36 report is about).
"""

import torch

EXPECTED = ["mean_of_means", "partial_window_not_stepped"]
OTHER = []
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": "not_stepped"}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    gradient_accumulation_steps, tr_loss = accum_steps, 0.0
    for step, batch in enumerate(micro_batches):
        loss = model(**batch).loss  # self.task_helper.train_step(batch) or the MLM loss
        if gradient_accumulation_steps > 1:
            loss = loss / gradient_accumulation_steps
        loss.backward()
        tr_loss += loss.item()
        if (step + 1) % gradient_accumulation_steps == 0:
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            model.zero_grad()
