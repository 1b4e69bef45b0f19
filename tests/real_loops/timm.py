"""timm's `train_one_epoch` with `--grad-accum-steps`.

Repository huggingface/pytorch-image-models, file train.py, commit
aa4b5850c1543fa488abf260f18390eda46cf85d, `train_one_epoch` (and `NativeScaler.__call__` in
timm/utils/cuda.py for the AMP path).

`last_accum_steps = len(loader) % accum_steps`; for the batches of that last short window
`accum_steps = last_accum_steps`. Each batch: `loss /= accum_steps` if accum_steps > 1; with
the loss scaler `scaler.scale(loss).backward()` and, when `need_update` (`(batch_idx + 1) %
accum_steps == 0` or the last batch), `unscale_` + clip + `scaler.step` + `update`; without it
`loss.backward()` and, when updating, clip + `optimizer.step()`. After an update:
`optimizer.zero_grad()` and `lr_scheduler.step_update(num_updates)`.

Expected: mean of means (each batch's mean loss / its window's length), but the short last
window is divided by its own length, so it is right: only mean_of_means.
"""

import torch

EXPECTED = ["mean_of_means"]
OTHER = []
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": 1.0}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, scaler=None,
           max_grad_norm=None):
    last_window = len(micro_batches) < accum_steps  # the epoch's last len(loader) % k batches
    for batch_idx, batch in enumerate(micro_batches):
        last_batch = last_window and batch_idx == len(micro_batches) - 1
        need_update = last_batch or (batch_idx + 1) % accum_steps == 0
        steps = len(micro_batches) if last_window else accum_steps  # last_accum_steps
        loss = model(**batch).loss
        if steps > 1:
            loss /= steps
        if scaler is not None:  # NativeScaler
            scaler.scale(loss).backward()
            if need_update:
                if max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
        else:
            loss.backward()
            if need_update:
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
        if not need_update:
            continue
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()  # lr_scheduler.step_update(num_updates=num_updates)
