"""The 2021 causal-LM example of Hugging Face Transformers without the Trainer.

Repository huggingface/transformers, file examples/pytorch/language-modeling/
run_clm_no_trainer.py, commit 00661e38a9e1393472adae9ac71f777b74ccdcde, the epoch loop.

Per micro-batch (`step` counts from 0 in each epoch): `loss = outputs.loss /
args.gradient_accumulation_steps`, `accelerator.backward(loss)` (an Accelerator without
accumulation: a plain backward); then `if step % args.gradient_accumulation_steps == 0 or
step == len(train_dataloader) - 1:` optimizer.step(), lr_scheduler.step(), zero_grad().

Expected: `step % k == 0` is true at step 0, so every epoch's first micro-batch is stepped
alone with 1/k of its gradient (step_off_by_one: the update is 0.25 g_1 for k=4), and the
windows after it are shifted by one. The port is the epoch's first window (step = index in
it); the probes after the basic update are moot.
"""

EXPECTED = ["step_off_by_one"]
OTHER = []
MEASURE = {"equal": ("first", 0.25), "unequal": None, "partial": None}


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None):
    end_of_loader = len(micro_batches) < accum_steps  # a short window ends the epoch
    for step, batch in enumerate(micro_batches):
        loss = model(**batch).loss
        loss = loss / accum_steps
        loss.backward()
        if step % accum_steps == 0 or (end_of_loader and step == len(micro_batches) - 1):
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
