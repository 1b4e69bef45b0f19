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
        return Diagnosis("function_raised", f"your function raised {type(mon.error).__name__}",
                         f"in the {probe} probe: {describe_error(mon.error)}", probe=probe)
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


def scale_finding(c: float, k: int, probe: str, scaler: bool, tol: float) -> Diagnosis | None:
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
