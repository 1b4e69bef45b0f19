"""`check_loop`: every probe in order, beside the exact reference (see `accumlab.doctor`)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from accumlab.doctor.diagnoses import (
    clip_finding,
    close,
    differs,
    fit_scale,
    logged_loss_finding,
    match_update,
    scale_finding,
    structure_finding,
)
from accumlab.doctor.harness import (
    Monitor,
    ProbeSGD,
    accepted_args,
    call_step,
    run_step,
    summarize,
)
from accumlab.doctor.probe import (
    CLIP_FRACTION,
    exact_update,
    make_probe_model,
    num_items,
    probe_windows,
)
from accumlab.doctor.report import CheckResult, Diagnosis


def check_loop(step_fn: Callable, *, accum_steps: int = 4, seed: int = 0,
               tolerance: float = 1e-4, name: str | None = None) -> CheckResult:
    """Run `step_fn` (one accumulation window; see `accumlab.doctor`) beside the exact reference.

    Returns a CheckResult whose `ok` says whether every probe matched, and whose `diagnoses`
    name each problem with its evidence. `accum_steps` (k >= 2) is the window length given to
    your function; `tolerance` is the relative difference still called equal (the models run in
    float64; transformers' own loss is float32, hence 1e-4 rather than 1e-12).
    """
    if not isinstance(accum_steps, int) or accum_steps < 2:
        raise ValueError(f"accum_steps must be an integer >= 2, got {accum_steps!r}")
    k, tol = accum_steps, tolerance
    name = name or getattr(step_fn, "__name__", "step_fn")
    accepted = accepted_args(step_fn)
    found: list[Diagnosis] = []
    not_checked: list[str] = []
    probes: dict[str, dict] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny float64 model: one thread is several times faster
    try:
        with torch.random.fork_rng(devices=[]):
            _probe_all(step_fn, accepted, k, tol, seed, found, not_checked, probes)
    finally:
        torch.set_num_threads(threads)
    return CheckResult(name, k, _dedupe(found), probes, not_checked)


def _probe_all(step_fn, accepted, k, tol, seed, found, not_checked, probes) -> None:
    """Run every probe and append findings to `found` (see check_loop)."""
    if True:
        model = make_probe_model(seed)
        data = probe_windows(k, seed)

        # 1. equal token counts: cadence, backward, scale, zero_grad placement
        exact, exact_loss = exact_update(model, data["equal"])
        per_mb = [exact_update(model, [b])[0] for b in data["equal"]]
        mon = equal_mon = run_step(step_fn, accepted, model, data["equal"], k)
        probes["equal"] = summarize(mon, k)
        problem = structure_finding(mon, k, "equal")
        scale = None
        if problem is not None:
            found.append(problem)
        else:
            g = mon.steps[0]
            c, resid = fit_scale(g, exact)
            probes["equal"]["scale"] = c
            if resid < tol:
                scale = c
                finding = scale_finding(c, k, "equal", "scaler" in accepted, tol)
                if finding is not None:
                    found.append(finding)
                elif mon.backwards == 1 and k > 1:
                    found.append(Diagnosis(
                        "deferred_backward",
                        "correct, but all micro-batch losses are summed into one deferred "
                        "backward",
                        f"{mon.forwards} forward passes and 1 backward pass: every micro-batch's "
                        "graph (its activations) stays in memory until the end of the window, "
                        f"so peak activation memory is about {k}× that of one micro-batch — "
                        "the memory that accumulation was meant to save",
                        "call backward on each micro-batch's loss as soon as it is computed",
                        severity="note", probe="equal"))
            else:
                label, c_last = match_update(g, {"last": per_mb[-1]}, tol)
                if label == "last":
                    erased = [i for i in mon.zero_grads if 0 < i < mon.backwards]
                    found.append(Diagnosis(
                        "zero_grad_inside_window",
                        "only the last micro-batch counts: gradients are zeroed inside the "
                        "window",
                        f"the update is {c_last:.2f}× the gradient of micro-batch {k} alone "
                        f"(relative residual < {tol:g}); zero_grad ran after backward passes "
                        f"{erased or mon.zero_grads}, erasing micro-batches 1..{k - 1}",
                        "call zero_grad once per window: after optimizer.step() (or before the "
                        "first micro-batch)", probe="equal"))
                else:
                    found.append(differs("equal", g, exact))
        if mon.returned is not None and problem is None:
            logged = logged_loss_finding(mon.returned, exact_loss, data["equal"], model, k)
            if logged:
                found.append(logged)

        direction_ok = scale is not None
        scale_ok = direction_ok and close(scale, 1.0, tol)
        if not direction_ok:
            not_checked.append("unequal token counts, partial window, clipping, scaler and "
                               "next-window probes (fix the window's basic update first)")

        # 2. unequal token counts: mean of means
        if direction_ok:
            exact_u, _ = exact_update(model, data["unequal"])
            mom_u, _ = exact_update(model, data["unequal"], normalization="mean_of_means")
            mon = run_step(step_fn, accepted, model, data["unequal"], k)
            probes["unequal"] = summarize(mon, k)
            counts = [num_items(b) for b in data["unequal"]]
            problem = structure_finding(mon, k, "unequal")
            if problem is not None:
                found.append(problem)
            else:
                g = mon.steps[0]
                c, resid = fit_scale(g, exact_u)
                if resid >= tol:
                    c_m, resid_m = fit_scale(g, mom_u)
                    if resid_m < tol:
                        off = float((mom_u - exact_u).norm() / exact_u.norm())
                        found.append(Diagnosis(
                            "mean_of_means",
                            "micro-batches are weighted equally, not tokens: mean of "
                            "per-micro-batch means with unequal token counts",
                            f"with n_j = {counts} label tokens per micro-batch your update "
                            f"matches the mean of the micro-batch means (residual {resid_m:.1e}) "
                            f"and differs from the exact token-weighted update by {off:.0%}: a "
                            f"token in a micro-batch of {min(counts)} weighs "
                            f"{max(counts) / min(counts):.1f}× one in a micro-batch of "
                            f"{max(counts)}",
                            "sum token losses and divide by the window's token count N "
                            "(counted before the first backward): loss_fn(model, b, 'sum') / N",
                            probe="unequal"))
                    else:
                        found.append(differs("unequal", g, exact_u))

        # 3. partial last window
        if scale_ok:
            m = len(data["partial"])
            exact_p, _ = exact_update(model, data["partial"])
            mon = run_step(step_fn, accepted, model, data["partial"], k)
            probes["partial"] = summarize(mon, m)
            if mon.error is None and not mon.steps and mon.backwards > 0:
                found.append(Diagnosis(
                    "partial_window_not_stepped",
                    f"a partial last window ({m} of {k} micro-batches) is never stepped",
                    f"{mon.backwards} backward passes and no optimizer step: the tail's "
                    "gradients are lost, or leak into the next epoch's first window",
                    "step after the last micro-batch of the window, whatever its length",
                    probe="partial"))
            else:
                problem = structure_finding(mon, m, "partial")
                if problem is not None:
                    found.append(problem)
                else:
                    g = mon.steps[0]
                    c, resid = fit_scale(g, exact_p)
                    if resid < tol and close(c, m / k, tol):
                        found.append(Diagnosis(
                            "partial_window_scaled_by_k",
                            f"a partial last window of {m} micro-batches is divided by k={k}: "
                            f"its update is {c:.2f}× the exact one",
                            f"with {m} of {k} micro-batches the update is {m}/{k} of the exact "
                            "one (Lightning #19987, Accelerate): the tail is under-weighted",
                            "divide by the window's own token count (or by len(micro_batches), "
                            "never by accum_steps)", probe="partial"))
                    elif resid >= tol or not close(c, 1.0, tol):
                        found.append(differs("partial", g, exact_p))

        # 4. scheduler cadence (counted in the equal probe, where a scheduler was passed)
        if "scheduler" in accepted:
            mon = equal_mon
            if mon.error is None and mon.steps:
                n = mon.scheduler_steps
                if n > 1:
                    found.append(Diagnosis(
                        "scheduler_every_micro_batch",
                        f"the LR scheduler stepped {n} times in one window of {k} "
                        "micro-batches",
                        f"scheduler.step() ran {n} times for {len(mon.steps)} optimizer "
                        f"step(s): the schedule runs {n}× too fast (accelerate #963, "
                        "diffusers #2632)",
                        "step the scheduler once per optimizer step, and size it in optimizer "
                        "steps", probe="equal"))
                elif n == 0:
                    found.append(Diagnosis(
                        "scheduler_not_stepped", "the LR scheduler was never stepped",
                        "a scheduler was passed and scheduler.step() ran 0 times",
                        "call scheduler.step() once after optimizer.step()", probe="equal"))
        else:
            not_checked.append("scheduler cadence (step_fn takes no `scheduler`)")

        # 5. clipping timing
        if "max_grad_norm" in accepted and scale_ok:
            max_norm = CLIP_FRACTION * float(exact.norm())
            mon = run_step(step_fn, accepted, model, data["equal"], k, max_grad_norm=max_norm)
            probes["clipping"] = summarize(mon, k)
            problem = structure_finding(mon, k, "clipping")
            if problem is not None:
                found.append(problem)
            else:
                g = mon.steps[0]
                clipped = exact * CLIP_FRACTION
                if float((g - clipped).norm() / clipped.norm()) >= tol:
                    found.append(clip_finding(g, exact, max_norm, mon, k, tol))
        elif "max_grad_norm" not in accepted:
            not_checked.append("clipping (step_fn takes no `max_grad_norm`)")

        if "scaler" not in accepted:
            not_checked.append("GradScaler (step_fn takes no `scaler`)")

        # 7. the next window: are gradients cleared between windows?
        if direction_ok:
            net = copy.deepcopy(model)
            net.zero_grad(set_to_none=True)
            first = Monitor(net)
            opt = ProbeSGD(net.parameters(), first)
            call_step(step_fn, accepted, net, opt, data["equal"], k, first)
            after_first = copy.deepcopy(net)
            after_first.zero_grad(set_to_none=True)
            exact_2, _ = exact_update(after_first, data["second"])
            second = Monitor(net)
            call_step(step_fn, accepted, net, opt, data["second"], k, second)
            probes["next_window"] = summarize(second, k)
            if second.error is None and len(second.steps) == 1 and first.steps:
                g2, g1 = second.steps[0], first.steps[0]
                c, resid = fit_scale(g2, exact_2)
                if resid >= tol:
                    c_leak, resid_leak = fit_scale(g2 - g1, exact_2)
                    if resid_leak < tol:
                        found.append(Diagnosis(
                            "zero_grad_missing",
                            "gradients leak into the next window: zero_grad is never called",
                            "the second window's update equals its own gradient plus the whole "
                            "first window's gradient (residual "
                            f"{resid_leak:.1e}); zero_grad ran {len(second.zero_grads)} times",
                            "call optimizer.zero_grad() once per window, after the step",
                            probe="next_window"))
                    else:
                        found.append(differs("next_window", g2, exact_2))


def _dedupe(found: list[Diagnosis]) -> list[Diagnosis]:
    seen, out = set(), []
    for d in found:
        if d is not None and d.code not in seen:
            seen.add(d.code)
            out.append(d)
    return out
