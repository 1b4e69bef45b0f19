"""The gradient-accumulation recipe of PyTorch-Ignite's FAQ, before issue #583 was fixed.

Repository pytorch/ignite, file docs/source/faq.rst, commit
85d09e9b6dadeba34958f0525cd47571aeb83a01 (the parent of 3c1cc89b, "Fixes #583"), the
`update_fn` of "Gradients accumulation".

`update_fn(engine, batch)` per iteration (`engine.state.iteration` counts from 1): `if
iteration % accumulation_steps == 0: optimizer.zero_grad()`; forward; `loss =
criterion(y_pred, y) / accumulation_steps`; `loss.backward()`; `if iteration %
accumulation_steps == 0: optimizer.step()`; `return loss.item()`.

Expected: zero_grad runs just before the window's last backward, erasing micro-batches
1..k-1: only the last micro-batch counts (zero_grad_inside_window; the update is g_k / k). The
returned loss, the last micro-batch's / k, is not the window loss (a warning).
"""

EXPECTED = ["zero_grad_inside_window"]
OTHER = ["logged_loss_wrong"]
MEASURE = {"equal": ("last", 0.25), "unequal": None, "partial": None}


def window(model, optimizer, micro_batches, accum_steps):
    accumulation_steps = accum_steps
    for i, batch in enumerate(micro_batches):
        iteration = i + 1  # engine.state.iteration, a window starting at a multiple of k
        model.train()
        if iteration % accumulation_steps == 0:
            optimizer.zero_grad()
        loss = model(**batch).loss / accumulation_steps
        loss.backward()
        if iteration % accumulation_steps == 0:
            optimizer.step()
    return loss.item()
