"""Accumulation loops ported from public training code, one module per loop.

Each module names the repository, file and commit it was read from, keeps the loop's
arithmetic (where it divides, zeroes, clips, steps and counts) as one window function with the
loop doctor's signature, and states what the doctor should say about it:

- `EXPECTED`: the bug codes, read from the code;
- `OTHER`: the warnings and notes (codes) the doctor should add;
- `MEASURE`: what the window's update is, measured independently of the doctor
  (`measure.py`): on equal token counts (a multiple of the exact update, "k", "unshifted",
  or ("first" / "last", c) for c times one micro-batch's gradient), on unequal counts ("exact"
  or "mean_of_means"), and on a partial window of k-1 micro-batches (a multiple, "m/k",
  "unshifted", "not_stepped" or "dropped"); None where an earlier bug makes it moot;
- `PRECISION`: "float32" where the loop cannot run in float64.

A port calls its window with window-local counters (step, batch_idx, iteration from the
window's start); where the original counts globally across epochs, its docstring says so.
"""

LOOPS = [
    "nanogpt_2023_unscaled", "nanogpt", "transformers_run_clm_2021", "transformers_trainer",
    "accelerate_autoregressive", "accelerate_accumulate", "lightning_automatic",
    "lightning_manual", "timm", "torchtune", "deepspeed", "fairseq", "pet", "ignite_faq",
]
