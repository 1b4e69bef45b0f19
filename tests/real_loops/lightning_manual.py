"""Gradient accumulation under Lightning's manual optimisation, as its documentation shows.

Repository Lightning-AI/pytorch-lightning, file docs/source-pytorch/model/
manual_optimization.rst, section "Gradient Accumulation", commit
7f0c3436cd3f6ad3753125672024fc415cbcb414.

`training_step(batch, batch_idx)`: `loss = self.compute_loss(batch) / N`;
`self.manual_backward(loss)`; `if (batch_idx + 1) % N == 0: opt.step(); opt.zero_grad()`.
No scheduler and no clipping in the example.

Expected: mean of means (a mean loss / N), and an epoch's last batches, when fewer than N, are
never stepped: `batch_idx` restarts each epoch without a zero_grad, so their gradients join
the next epoch's first window (partial_window_not_stepped).
"""

EXPECTED = ["mean_of_means", "partial_window_not_stepped"]
OTHER = []
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": "not_stepped"}


def window(model, optimizer, micro_batches, accum_steps):
    N = accum_steps
    opt = optimizer  # self.optimizers()
    for batch_idx, batch in enumerate(micro_batches):
        loss = model(**batch).loss / N  # self.compute_loss(batch) / N
        loss.backward()  # self.manual_backward(loss)
        if (batch_idx + 1) % N == 0:
            opt.step()
            opt.zero_grad()
