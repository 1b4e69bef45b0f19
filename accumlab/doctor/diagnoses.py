"""Naming the bug: each finding compares an observed update (or cadence) with the exact one
and states the known pattern it matches, with its evidence and fix."""

from __future__ import annotations

import math

import torch

from accumlab.doctor.harness import Monitor, describe_error
from accumlab.doctor.probe import SCALER_SCALE, loss_fn
from accumlab.doctor.report import Diagnosis


def fit_scale(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Best scale c with g ~ c * ref, and the relative residual ||g - c ref|| / ||g||."""
    denom = float(ref @ ref)
    if denom == 0.0 or float(g.norm()) == 0.0:
        return 0.0, math.inf
    c = float(g @ ref) / denom
    return c, float((g - c * ref).norm() / g.norm())


def close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b))


def structure_finding(mon: Monitor, n_micro: int, probe: str) -> Diagnosis | None:
    """Findings that make the numbers meaningless: an exception, no step, several steps."""
    if mon.error is not None:
        msg = str(mon.error)
        if "does not require grad" in msg or "does not have a grad_fn" in msg:
            return Diagnosis(
                "detached_loss",
                "no gradient flows: the loss was detached (.item(), .detach() or a new tensor) "
                "before backward",
                f"in the {probe} probe your function raised {describe_error(mon.error)}",
                "accumulate the loss tensors themselves (or call backward on each micro-batch's "
                "loss); use .item() only for logging", probe=probe)
        return raised_finding(mon.error, probe)
    if len(mon.steps) > 1:
        return Diagnosis(
            "step_every_micro_batch",
            f"the optimizer stepped {len(mon.steps)} times in one window of {n_micro} "
            "micro-batches",
            f"optimizer.step() ran after backward passes {mon.step_at}; an accumulation window "
            "steps once, after its last micro-batch",
            "call optimizer.step() (and zero_grad) only after the last micro-batch of the window",
            probe=probe)
    if not mon.steps or float(mon.steps[0].norm()) == 0.0:
        if mon.backwards == 0:
            stepped = "and the optimizer stepped on empty gradients" if mon.steps else \
                "and no optimizer step"
            return Diagnosis(
                "no_backward", "no update: backward was never called",
                f"0 backward passes for {n_micro} micro-batches ({mon.forwards} forward "
                f"passes), {stepped}; the parameters did not move",
                "call loss.backward() (or scaler.scale(loss).backward()) for every micro-batch",
                probe=probe)
        if mon.steps:
            return Diagnosis(
                "detached_loss",
                "no update: backward ran but no gradient reached the parameters (the loss was "
                "detached, e.g. accumulated with .item())",
                f"{mon.backwards} backward pass(es), yet every gradient was zero when "
                "optimizer.step() ran",
                "backpropagate the loss tensor itself; use .item() only for logging",
                probe=probe)
        return Diagnosis(
            "no_optimizer_step", "no update: optimizer.step() was never called",
            f"{mon.backwards} backward passes for {n_micro} micro-batches and 0 optimizer steps",
            "call optimizer.step() once after the last micro-batch", probe=probe)
    return None


def raised_finding(error: BaseException, probe: str) -> Diagnosis:
    """The function raised (or called sys.exit(), or was interrupted): say so, never re-raise."""
    if isinstance(error, SystemExit):
        title = f"your function called sys.exit({error.code!r})"
        fix = "return from the function instead of exiting the process"
    elif isinstance(error, KeyboardInterrupt):
        title = "your function raised KeyboardInterrupt (or the check was interrupted)"
        fix = "the check stopped here; run it again"
    else:
        title, fix = f"your function raised {type(error).__name__}", ""
    return Diagnosis("function_raised", title, f"in the {probe} probe: {describe_error(error)}",
                     fix, probe=probe)


def scale_finding(c: float, k: int, probe: str, scaler: bool, tol: float,
                  unshifted: float | None = None) -> Diagnosis | None:
    """Name a wrong length of an otherwise exact update. `unshifted` is N_shifted / N_unshifted
    of the probe window: the scale of a loop that counts labels before the causal shift."""
    if close(c, 1.0, tol):
        return None
    title_scale = f"your update is {c:.2f}× the exact one"
    if close(c, float(k), tol):
        return Diagnosis(
            "loss_not_scaled",
            f"{title_scale}: the loss is not divided by the number of accumulation steps",
            f"with k={k} micro-batches of equal token counts the update points exactly the "
            f"exact way, {c:.4f} times as long",
            "divide each micro-batch's loss by k (or, better, sum token losses and divide by "
            "the window's token count)", probe=probe)
    if close(c, 1.0 / k, tol):
        return Diagnosis(
            "loss_scaled_twice",
            f"{title_scale}: the loss is divided by k twice",
            f"the update has the exact direction and 1/{k} of its length",
            "divide once (a framework like Accelerate or DeepSpeed may already divide by k)",
            probe=probe)
    if scaler and close(c, SCALER_SCALE, tol):
        return Diagnosis(
            "scaler_not_unscaled",
            f"{title_scale}: the GradScaler's scale ({SCALER_SCALE:g}) was never removed",
            "the optimizer stepped on gradients still multiplied by the loss scale",
            "step with scaler.step(optimizer) and scaler.update() (or scaler.unscale_ first)",
            probe=probe)
    if unshifted is not None and close(c, unshifted, tol):
        return Diagnosis(
            "wrong_scale",
            f"{title_scale}: the token count includes the first label of every row",
            f"{c:.4f} = (label tokens after the causal shift) / (labels before it) of this "
            "window: N also counts each row's first label, which no position predicts, so every "
            "update is a little too short (transformers PR #46204; the Hugging Face Trainer "
            "counts this way for a model whose loss_type is None, as a stock GPT2LMHeadModel's is)",
            "count labels[:, 1:] != -100 (what the model's loss averages over), or set "
            "model.loss_type = 'ForCausalLM' before building the Trainer", probe=probe)
    return Diagnosis("wrong_scale", f"{title_scale}",
                     "the update has the exact direction but the wrong length",
                     "the window's gradient must be (sum of token losses) / (token count)",
                     probe=probe)


def match_update(g, candidates: dict[str, torch.Tensor], tol: float):
    """Name of the first candidate that g is a multiple of, with its scale."""
    for name, ref in candidates.items():
        c, resid = fit_scale(g, ref)
        if resid < tol and c > 0:
            return name, c
    return None, None


def differs(probe: str, g: torch.Tensor, ref: torch.Tensor) -> Diagnosis:
    rel = float((g - ref).norm() / ref.norm())
    cos = float(g @ ref / (g.norm() * ref.norm()))
    return Diagnosis(
        "update_differs", f"the update differs from the exact one ({probe} probe)",
        f"relative difference {rel:.2e}, cosine {cos:.4f}, length ratio "
        f"{float(g.norm() / ref.norm()):.3f}; no known pattern matches",
        "compare with accumlab.engine.window: sum of token losses / window token count, one step",
        probe=probe)


def clip_finding(g, exact, max_norm, mon: Monitor, k: int, tol: float) -> Diagnosis:
    norm = float(g.norm())
    calls = (f"clip_grad_norm_ ran {len(mon.clips)} time(s), after backward passes "
             f"{mon.clips} of {mon.backwards}") if mon.clips else "clip_grad_norm_ calls unseen"
    if float((g - exact).norm() / exact.norm()) < tol:
        return Diagnosis(
            "clip_missing", "max_grad_norm was given but the gradient was not clipped",
            f"the update has norm {norm:.3g} > max_grad_norm {max_norm:.3g}; {calls}",
            "clip the accumulated gradient once, after the last backward, before the step",
            probe="clipping")
    early = [c for c in mon.clips if c < mon.backwards]
    if norm <= max_norm * (1 + tol) or early:
        return Diagnosis(
            "clip_per_micro_batch",
            "gradients are clipped per micro-batch or before the window ends",
            f"the update (norm {norm:.3g}, max_grad_norm {max_norm:.3g}) is not the clipped "
            f"exact gradient (cosine "
            f"{float(g @ exact / (g.norm() * exact.norm())):.4f}); {calls}",
            "clip once, after the last micro-batch's backward and before optimizer.step() "
            "(after scaler.unscale_ under AMP); accelerate #641", probe="clipping")
    return differs("clipping", g, exact * (max_norm / float(exact.norm())))


def logged_loss_finding(returned, exact_loss: float, batches, model, k) -> Diagnosis | None:
    try:
        value = float(returned.detach() if isinstance(returned, torch.Tensor) else returned)
    except (TypeError, ValueError):
        return None
    if close(value, exact_loss, 1e-4):
        return None
    last = float(loss_fn(model, batches[-1]).detach())
    label = "none of the usual mistakes"
    for name, candidate in ((f"the last micro-batch's loss × {k}", last * k),
                             ("the last micro-batch's loss", last),
                             (f"the last micro-batch's loss / {k}", last / k),
                             (f"{k}× the window loss", exact_loss * k)):
        if close(value, candidate, 1e-4):
            label = name
            break
    return Diagnosis(
        "logged_loss_wrong", f"the returned (logged) loss {value:.4f} is not the window loss "
        f"{exact_loss:.4f}", f"it equals {label}",
        "log the window's loss: sum of token losses / token count (Lightning #2569, "
        "transformers #35204)", severity="warning", probe="equal")


def early_step_finding(c: float, j: int, mon: Monitor, n_micro: int, probe: str) -> Diagnosis:
    """One step after micro-batch j < n of the window: the update is micro-batches 1..j only."""
    which = "micro-batch 1" if j == 1 else f"micro-batches 1..{j}"
    evidence = (f"one optimizer step, after backward pass {j} of {mon.backwards}: the update is "
                f"{c:.2f}× the gradient of {which} alone; micro-batches {j + 1}..{n_micro} "
                "were backpropagated after the step, so their gradients wait in .grad and join "
                "the next window")
    if j == 1:
        evidence += (" (the off-by-one of `if step % k == 0` with step counting from 0: the "
                     "window's first micro-batch is stepped alone)")
    return Diagnosis(
        "step_off_by_one" if j == 1 else "step_before_window_end",
        f"the optimizer steps after micro-batch {j} of the window, not after the last "
        f"({n_micro})", evidence,
        "step after the last micro-batch of the window: `if (step + 1) % k == 0` with step "
        "counting from 0, or once after the loop over the window", probe=probe)


def dropped_finding(dropped: dict[int, Monitor], rows: int, k: int,
                    wasted: bool) -> Diagnosis:
    """A partial last window that is skipped: a policy (torchtune, partial_window="drop")."""
    lengths = sorted(dropped)
    passes = ", ".join(f"{m}: {mon.forwards} forward and {mon.backwards} backward passes"
                       for m, mon in sorted(dropped.items()))
    evidence = (f"windows of {' and '.join(map(str, lengths))} micro-batches (k={k}) made no "
                f"step and left no gradient behind ({passes}): the last len(dataset) mod "
                f"(k × micro-batch size) examples of every epoch are never trained on — up to "
                f"{(k - 1) * rows} examples per epoch with {rows} per micro-batch, and the same "
                "ones every epoch unless the data is reshuffled")
    if wasted:
        evidence += "; their forward and backward passes were computed and thrown away"
    return Diagnosis(
        "partial_window_dropped",
        "partial window dropped: a last window shorter than k is skipped (a policy, not a bug)",
        evidence,
        "fine if intended (torchtune, accumlab's partial_window='drop'); to train on the tail, "
        "step it normalised by its own token count", severity="note", probe="partial")


def timeout_finding(timeout: float, stage: str, isolated: bool) -> Diagnosis:
    how = ("in a child process, stopped it" if isolated else
           "with a watchdog, interrupted it")
    return Diagnosis(
        "timed_out", f"your function did not finish within {timeout:g} s ({stage} probe)",
        f"the check ran it {how} after {timeout:g} s; an endless loop (for instance a `while` "
        "that waits for accum_steps micro-batches in a shorter window) or a very slow function",
        "make sure the function returns for every window, also one shorter than accum_steps; "
        "pass a larger timeout= if it is only slow", probe=stage)


def crashed_finding(how: str, stage: str) -> Diagnosis:
    return Diagnosis(
        "check_crashed", f"the check's child process ended without a result ({stage} probe)",
        f"it {how}: the function may have called os._exit() or crashed the interpreter",
        "run check_loop(..., isolate='thread') to see the error in your own process",
        probe=stage)


def float32_note(error: str, tol: float) -> Diagnosis:
    return Diagnosis(
        "probed_in_float32",
        "your function needs float32: every verdict here comes from a float32 probe model",
        f"in float64 it raised {error}; rerun on the same GPT-2 in float32, judged with "
        f"tolerance {tol:g} (float32 rounding) instead of the float64 run's",
        "", severity="note")
