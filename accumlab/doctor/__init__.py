"""The loop doctor: run your accumulation step on a tiny model and name what is wrong with it.

You write the function that performs ONE accumulation window, in your own style:

    def step_fn(model, optimizer, micro_batches, accum_steps, *,
                scheduler=None, scaler=None, loss_fn=None, max_grad_norm=None):
        ...   # forward/backward every micro-batch, then step once

- `model` is a tiny stock GPT-2 (`transformers.GPT2LMHeadModel`, float64, dropout off, its
  `loss_type` None as in any model built from a config or checkpoint);
- `optimizer` is plain SGD (lr=1, no momentum), so a scale error shows in the update;
  `optimizer.step(closure)` works: the closure runs first, and the step is judged by the
  gradient it really used (Lightning's automatic optimisation does this);
- `micro_batches` is a list of padded dicts (`input_ids`, `attention_mask`, `labels`, with
  -100 on padding): `model(**batch).loss` is that micro-batch's mean token loss. The list may
  hold FEWER than `accum_steps` micro-batches (k-1, one, and a pair with unequal token counts):
  the last, partial window of an epoch;
- `accum_steps` is k, the configured number of micro-batches per window;
- keyword arguments are passed only if your function names them (or takes `**kwargs`):
  `scheduler` (a constant LR scheduler to step once per optimizer step; the same one through
  consecutive windows), `scaler` (a `torch.amp.GradScaler` with scale 1024), `max_grad_norm`
  (clip the accumulated gradient to this norm; None except in the clipping probe),
  `loss_fn(model, batch, reduction="mean")` (the micro-batch's mean token loss, or with
  `reduction="sum"` its summed token loss; `num_items(batch)` counts its label tokens).

Your function decides how to normalise. The exact update (DESIGN, "one accumulation window")
uses the gradient of (sum of token losses over the window) / (label tokens in the window), at
the parameters where the window started, and steps the optimizer, the scheduler, clipping and
the scaler exactly once. A window shorter than k may also be skipped whole: that is a policy
(torchtune, `partial_window="drop"`), reported as a note with what it costs.

`check_loop(step_fn)` runs your function in several probes beside that exact reference
(`accumlab.engine.window`) and returns a `CheckResult`: `.ok`, `.codes` (the bugs),
`.diagnoses` (each a named finding with its evidence: bugs, warnings and notes),
`.not_checked` (the probes that could not run, and why) and `.precision` (of the probe model
the verdicts came from: float64, or float32 when your function raises a dtype error in float64).
Why SGD: Adam's first update is about lr * sign(gradient), whatever the gradient's scale, so
Adam hides a loss that is k times too large; SGD's update is the gradient itself.

The check never hangs and never takes the caller down: it stops after `timeout` seconds (a
`timed_out` finding), and sys.exit() or KeyboardInterrupt inside your function is reported. On
Linux it runs in a forked child process (closures and notebook functions need no pickling);
elsewhere in your process with a watchdog thread, which cannot stop a function stuck in one
long C call (see `accumlab.doctor.isolation`). Global torch state your function changes (grad
mode, default dtype and device, threads) is restored after every call.

What a window check cannot see (tests/real_loops/ shows several of these):

- counters that run across windows and epochs. The doctor calls your function once per window,
  so a loop whose step, zero_grad or schedule depends on a global index behaves as its window
  does when that index starts at the window. DeepSpeed's `micro_steps` and ignite's
  `engine.state.iteration` carry a short epoch tail into the next epoch's first window and shift
  every later boundary; the doctor sees the tail "not stepped" (or, where the next window
  zeroes first, dropped). Swin-Transformer (main.py at 7a444c1d) calls
  `lr_scheduler.step_update(epoch * num_steps + idx)` once per window with a micro-batch index:
  the doctor counts one call per window, but whether that index and the schedule's length are
  in the same unit (there, both in micro-batches) it cannot tell;
- what a scheduler call means: calls are counted, not the values a schedule produces, nor a
  learning rate the loop sets by hand from a global iteration (nanoGPT's get_lr);
- data: batches are the probe's, so a collator that shifts labels twice, drops rows, or packs
  without resetting attention is invisible; so are DDP synchronisation (`no_sync` around the
  forward too), ranks, and dropout or BatchNorm (the probe has neither);
- the logged loss is compared only when your function returns it;
- a scale error tied to k (no division, or division twice) hides how the partial window is
  normalised: that probe is then listed under "not checked" until the scale is fixed.
"""

from accumlab.doctor.check import check_loop
from accumlab.doctor.probe import make_probe_model, num_items, probe_reference, probe_windows
from accumlab.doctor.report import CheckResult, Diagnosis

__all__ = ["CheckResult", "Diagnosis", "check_loop", "make_probe_model", "num_items",
           "probe_reference", "probe_windows"]
