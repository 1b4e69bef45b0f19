"""The loop doctor: run your accumulation step on a tiny model and name what is wrong with it.

You write the function that performs ONE accumulation window, in your own style:

    def step_fn(model, optimizer, micro_batches, accum_steps, *,
                scheduler=None, scaler=None, loss_fn=None, max_grad_norm=None):
        ...   # forward/backward every micro-batch, then step once

- `model` is a tiny GPT-2 (`transformers.GPT2LMHeadModel`, float64, dropout off);
- `optimizer` is plain SGD (lr=1, no momentum), so a scale error shows in the update;
- `micro_batches` is a list of padded dicts (`input_ids`, `attention_mask`, `labels`, with
  -100 on padding): `model(**batch).loss` is that micro-batch's mean token loss. The list may
  hold FEWER than `accum_steps` micro-batches: that is the last, partial window of an epoch;
- `accum_steps` is k, the configured number of micro-batches per window;
- keyword arguments are passed only if your function names them (or takes `**kwargs`):
  `scheduler` (a constant LR scheduler to step once per optimizer step; always passed),
  `scaler` (a `torch.amp.GradScaler` with scale 1024; always passed), `max_grad_norm` (clip
  the accumulated gradient to this norm; None except in the clipping probe),
  `loss_fn(model, batch, reduction="mean")` (the micro-batch's mean token loss, or with
  `reduction="sum"` its summed token loss; `num_items(batch)` counts its label tokens).

Your function decides how to normalise. The exact update (DESIGN, "one accumulation window")
uses the gradient of (sum of token losses over the window) / (label tokens in the window), at
the parameters where the window started, and steps the optimizer, the scheduler, clipping and
the scaler exactly once.

`check_loop(step_fn)` runs your function in several probes beside that exact reference
(`accumlab.engine.window`) and returns a `CheckResult`: `.ok`, and `.diagnoses`, each a named finding
with its evidence. Why SGD: Adam's first update is about lr * sign(gradient), whatever the
gradient's scale, so Adam hides a loss that is k times too large; SGD's update is the gradient
itself.
"""

from accumlab.doctor.check import check_loop
from accumlab.doctor.probe import make_probe_model, num_items, probe_reference, probe_windows
from accumlab.doctor.report import CheckResult, Diagnosis

__all__ = ["CheckResult", "Diagnosis", "check_loop", "make_probe_model", "num_items",
           "probe_reference", "probe_windows"]
