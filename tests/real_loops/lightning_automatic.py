"""Lightning's automatic optimisation with `Trainer(accumulate_grad_batches=k)`.

Repository Lightning-AI/pytorch-lightning, commit 7f0c3436cd3f6ad3753125672024fc415cbcb414:
src/lightning/pytorch/loops/optimization/automatic.py (`ClosureResult.
from_training_step_output`, `Closure.closure`, `_AutomaticOptimization.run`,
`_make_zero_grad_fn`), loops/training_epoch_loop.py (`_should_accumulate`,
`_accumulated_batches_reached`, `_num_ready_batches_reached`, `update_lr_schedulers`),
plugins/precision/precision.py (`optimizer_step`, `_wrap_closure`, `_after_closure`).

Each batch builds a closure: training_step's loss divided by `accumulate_grad_batches`
(always the full k), zero_grad when `batch_idx % k == 0` (before backward), then backward.
While accumulating (`ready % k != 0` and not the epoch's final batch) the closure is called
directly; otherwise `optimizer.step(closure=...)` runs it *inside* the step, then clips
(`gradient_clip_val`, after the closure) and steps; the step-interval scheduler steps once.

Expected: the last micro-batch's backward runs inside `optimizer.step(closure)`, which the doctor
must follow; then mean of means (training_step returns a mean loss) and a short final window
divided by the full k (Lightning #19987): partial_window_scaled_by_k.
"""

import torch

EXPECTED = ["mean_of_means", "partial_window_scaled_by_k"]
OTHER = []
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": "m/k"}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    accumulate_grad_batches = accum_steps
    final = len(micro_batches) - 1 if len(micro_batches) < accum_steps else None
    for batch_idx, batch in enumerate(micro_batches):

        def closure(batch=batch, batch_idx=batch_idx):
            with torch.enable_grad():
                loss = model(**batch).loss / accumulate_grad_batches  # training_step, normalize
                if batch_idx % accumulate_grad_batches == 0:  # is_first_batch_to_accumulate
                    optimizer.zero_grad()
                loss.backward()
            return loss

        ready = batch_idx + 1
        should_accumulate = ready % accumulate_grad_batches != 0 and batch_idx != final
        if should_accumulate:
            closure()
        else:
            def wrapped(closure=closure):  # Precision._wrap_closure, then _after_closure clips
                result = closure()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                return result

            optimizer.step(closure=wrapped)
            if scheduler is not None:  # update_lr_schedulers("step") when not accumulating
                scheduler.step()
