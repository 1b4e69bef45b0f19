"""DeepSpeed's engine with `gradient_accumulation_steps`, driven the documented way.

Repository deepspeedai/DeepSpeed, file deepspeed/runtime/engine.py, commit
edaa7221267243c7be7fb49c5d5f5c4fb97b4641: `backward` (gradients divided by
`gradient_accumulation_steps()` through `_backward_prologue_per_tensor` when `scale_wrt_gas`),
`is_gradient_accumulation_boundary` (`(micro_steps + 1) % gradient_accumulation_steps == 0`),
`step` (a model step only at the boundary; `micro_steps += 1` always) and `_take_model_step`
(clip to `gradient_clipping`, `optimizer.step()`, `zero_grad` setting `param.grad = None`,
`lr_scheduler.step()`). The loop is DeepSpeed's usual one: `loss = engine(batch);
engine.backward(loss); engine.step()` for every micro-batch. Plain fp32, no ZeRO.

Expected: mean of means (mean loss / GAS), and a window shorter than GAS reaches no boundary:
no step, its gradients stay (partial_window_not_stepped). DeepSpeed's `micro_steps` counts
across epochs, so in a real run those leftovers merge into the next epoch's first window and
shift every later boundary (#7439: "DS will not automatically handle incomplete gradient
accumulation steps"); the port keeps a window-local counter, which the window check can see.
"""

import torch

EXPECTED = ["mean_of_means", "partial_window_not_stepped"]
OTHER = []
MEASURE = {"equal": 1.0, "unequal": "mean_of_means", "partial": "not_stepped"}


class Engine:
    def __init__(self, model, optimizer, gradient_accumulation_steps, gradient_clipping,
                 lr_scheduler):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.gas, self.clipping, self.micro_steps = gradient_accumulation_steps, gradient_clipping, 0

    def __call__(self, batch):
        return self.module(**batch).loss

    def backward(self, loss):
        (loss / self.gas).backward()  # grad / gradient_accumulation_steps() per tensor

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.gas == 0

    def step(self):
        if self.is_gradient_accumulation_boundary():  # _take_model_step
            if self.clipping > 0.0:
                torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clipping)
            self.optimizer.step()
            for param in self.module.parameters():  # zero_grad
                param.grad = None
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        self.micro_steps += 1


def window(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    engine = Engine(model, optimizer, accum_steps, max_grad_norm or 0.0, scheduler)
    for batch in micro_batches:
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
