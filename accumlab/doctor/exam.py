"""The probes of one check, in order: each runs the step function on fixed windows beside the
exact update and appends what it finds (see `accumlab.doctor` for the contract)."""

from __future__ import annotations

import torch

from accumlab.doctor.diagnoses import (
    clip_finding,
    close,
    differs,
    dropped_finding,
    early_step_finding,
    fit_scale,
    logged_loss_finding,
    match_update,
    scale_finding,
    structure_finding,
)
from accumlab.doctor.harness import Monitor, Run, summarize
from accumlab.doctor.probe import (
    CLIP_FRACTION,
    exact_update,
    make_probe_model,
    num_items,
    probe_windows,
)
from accumlab.doctor.report import CheckResult, Diagnosis

PARTIALS = ("partial", "partial_1", "partial_unequal")
K_TIED = ("loss_not_scaled", "loss_scaled_twice")


class Exam:
    """One check at one precision: the probe model, its windows, and what was found so far."""

    def __init__(self, step_fn, accepted: set[str], k: int, seed: int, tol: float,
                 dtype: torch.dtype, name: str, report):
        self.step_fn, self.accepted, self.k, self.tol, self.name = step_fn, accepted, k, tol, name
        self.report = report  # report(snapshot, stage): progress, for a time limit
        self.precision = str(dtype).removeprefix("torch.")
        self.model = make_probe_model(seed, dtype)
        self.data = probe_windows(k, seed)
        self.found: list[Diagnosis] = []
        self.not_checked: list[str] = []
        self.probes: dict[str, dict] = {}
        self.first_error: BaseException | None = None
        self.scale: float | None = None  # the equal probe's length ratio, if its direction is exact
        self.scale_code: str | None = None
        self.unshifted = False  # the scale is a label count taken before the causal shift
        self.equal_mon: Monitor | None = None

    def result(self) -> CheckResult:
        seen, found = set(), []
        for d in self.found:
            if d.code not in seen:
                seen.add(d.code)
                found.append(d)
        return CheckResult(self.name, self.k, found, dict(self.probes), list(self.not_checked),
                           precision=self.precision)

    def window(self, probe: str, batches: list[dict], run: Run | None = None,
               **extra) -> Monitor:
        run = run or Run(self.step_fn, self.accepted, self.model, probe)
        mon = run.window(batches, self.k, **extra)
        if mon.error is not None and self.first_error is None:
            self.first_error = mon.error
        return mon

    def stage(self, name: str) -> None:
        self.report(self.result(), name)

    def run_all(self) -> None:
        self.stage("equal")
        self.equal()
        direction_ok = self.scale is not None
        if direction_ok:
            self.stage("unequal")
            self.unequal()
            if self.scale_code in K_TIED:
                self.not_checked.append("partial windows (the update's length is tied to k: "
                                        f"fix {self.scale_code} first)")
            else:
                self.partials()
        else:
            self.not_checked.append("unequal token counts, partial windows, clipping and "
                                    "next-window probes (fix the window's basic update first)")
        self.scheduler()
        if "max_grad_norm" not in self.accepted:
            self.not_checked.append("clipping (step_fn takes no `max_grad_norm`)")
        elif direction_ok:
            self.stage("clipping")
            self.clipping()
        if "scaler" not in self.accepted:
            self.not_checked.append("GradScaler (step_fn takes no `scaler`)")
        if direction_ok:
            self.stage("next_window")
            self.next_window()

    # ------------------------------------------------------------------------- equal counts

    def equal(self) -> None:
        """Cadence, backward, scale and zero_grad placement, on k micro-batches of equal size."""
        data, k, tol = self.data["equal"], self.k, self.tol
        exact, exact_loss = exact_update(self.model, data)
        mon = self.equal_mon = self.window("equal", data)
        self.probes["equal"] = summarize(mon, k)
        problem = structure_finding(mon, k, "equal")
        if problem is not None:
            self.found.append(problem)
            return
        g = mon.steps[0]
        c, resid = fit_scale(g, exact)
        self.probes["equal"]["scale"] = c
        if resid < tol:
            self.scale = c
            finding = scale_finding(c, k, "equal", "scaler" in self.accepted, tol,
                                    unshifted=_unshifted_ratio(data))
            self.unshifted = close(c, _unshifted_ratio(data), tol) and not close(c, 1.0, tol)
            if finding is not None:
                self.scale_code = finding.code
                self.found.append(finding)
            elif mon.backwards == 1 and k > 1:
                self.found.append(Diagnosis(
                    "deferred_backward",
                    "correct, but all micro-batch losses are summed into one deferred backward",
                    f"{mon.forwards} forward passes and 1 backward pass: every micro-batch's "
                    "graph (its activations) stays in memory until the end of the window, so "
                    f"peak activation memory is about {k}× that of one micro-batch — the memory "
                    "that accumulation was meant to save",
                    "call backward on each micro-batch's loss as soon as it is computed",
                    severity="note", probe="equal"))
        else:
            self.found.append(self._wrong_direction(g, mon, data))
        if mon.returned is not None:
            logged = logged_loss_finding(mon.returned, exact_loss, data, self.model, k)
            if logged:
                self.found.append(logged)

    def _wrong_direction(self, g, mon: Monitor, data) -> Diagnosis:
        k, tol = self.k, self.tol
        label, c_last = match_update(g, {"last": exact_update(self.model, data[-1:])[0]}, tol)
        if label == "last":
            erased = [i for i in mon.zero_grads if 0 < i < mon.backwards]
            return Diagnosis(
                "zero_grad_inside_window",
                "only the last micro-batch counts: gradients are zeroed inside the window",
                f"the update is {c_last:.2f}× the gradient of micro-batch {k} alone (relative "
                f"residual < {tol:g}); zero_grad ran after backward passes "
                f"{erased or mon.zero_grads}, erasing micro-batches 1..{k - 1}",
                "call zero_grad once per window: after optimizer.step() (or before the first "
                "micro-batch)", probe="equal")
        j = mon.step_at[0]
        if 0 < j < k:
            c, resid = fit_scale(g, exact_update(self.model, data[:j])[0])
            if resid < tol and c > 0:
                return early_step_finding(c, j, mon, k, "equal")
        return differs("equal", g, exact_update(self.model, data)[0])

    # ------------------------------------------------------------------------- unequal counts

    def unequal(self) -> None:
        """Mean of means: micro-batches with unequal token counts must be weighted by tokens."""
        data, tol = self.data["unequal"], self.tol
        exact_u, _ = exact_update(self.model, data)
        mon = self.window("unequal", data)
        self.probes["unequal"] = summarize(mon, self.k)
        problem = structure_finding(mon, self.k, "unequal")
        if problem is not None:
            self.found.append(problem)
            return
        g = mon.steps[0]
        if fit_scale(g, exact_u)[1] < tol:
            return
        mom_u, _ = exact_update(self.model, data, normalization="mean_of_means")
        c_m, resid_m = fit_scale(g, mom_u)
        if resid_m >= tol:
            self.found.append(differs("unequal", g, exact_u))
            return
        counts = [num_items(b) for b in data]
        off = float((mom_u - exact_u).norm() / exact_u.norm())
        self.found.append(Diagnosis(
            "mean_of_means",
            "micro-batches are weighted equally, not tokens: mean of per-micro-batch means with "
            "unequal token counts",
            f"with n_j = {counts} label tokens per micro-batch your update matches the mean of "
            f"the micro-batch means (residual {resid_m:.1e}) and differs from the exact "
            f"token-weighted update by {off:.0%}: a token in a micro-batch of {min(counts)} "
            f"weighs {max(counts) / min(counts):.1f}× one in a micro-batch of {max(counts)}",
            "sum token losses and divide by the window's token count N (counted before the "
            "first backward): loss_fn(model, b, 'sum') / N", probe="unequal"))

    # ------------------------------------------------------------------------- partial windows

    def partials(self) -> None:
        """The last window of an epoch, of several lengths: stepped right, scaled by k, never
        stepped (its gradients leak into the next window), or dropped (a policy: a note)."""
        dropped: dict[int, Monitor] = {}
        wasted = False
        for name in (n for n in PARTIALS if n in self.data):
            batches = self.data[name]
            m = len(batches)
            self.stage(name)
            run = Run(self.step_fn, self.accepted, self.model, name)
            mon = self.window(name, batches, run=run)
            self.probes[name] = summarize(mon, m)
            if mon.error is None and not mon.steps and mon.moved == 0:
                if float(mon.grad_left.norm()) == 0 or self._tail_discarded(run):
                    dropped[m] = mon
                    wasted = wasted or mon.backwards > 0
                    continue
                self.found.append(Diagnosis(
                    "partial_window_not_stepped",
                    f"a partial last window ({m} of {self.k} micro-batches) is never stepped",
                    f"{mon.backwards} backward passes and no optimizer step: the tail's "
                    "gradients are lost, or leak into the next epoch's first window",
                    "step after the last micro-batch of the window, whatever its length",
                    probe=name))
                continue
            problem = structure_finding(mon, m, name)
            if problem is not None:
                self.found.append(problem)
                continue
            scale = _unshifted_ratio(batches) if self.unshifted else self.scale
            self._judge_partial(mon.steps[0] / scale, batches, name)
        if dropped:
            rows = self.data["partial"][0]["input_ids"].shape[0]
            self.found.append(dropped_finding(dropped, rows, self.k, wasted))

    def _tail_discarded(self, run: Run) -> bool:
        """Gradients were left in .grad: does the next window throw them away (a drop, with its
        compute wasted) or add them to its own update (a leak)?"""
        second = self.data["second"]
        exact_2, _ = exact_update(self.model, second)  # the parameters did not move
        mon = run.window(second, self.k)
        return mon.error is None and len(mon.steps) == 1 and \
            fit_scale(mon.steps[0], exact_2)[1] < self.tol

    def _judge_partial(self, g: torch.Tensor, batches: list[dict], name: str) -> None:
        m, k, tol = len(batches), self.k, self.tol
        exact_p, _ = exact_update(self.model, batches)
        c, resid = fit_scale(g, exact_p)
        if resid >= tol and name == "partial_unequal":  # mean of means: reported already
            c, resid = fit_scale(g, exact_update(self.model, batches, "mean_of_means")[0])
        if resid < tol and close(c, 1.0, tol):
            return
        if resid < tol and close(c, m / k, tol):
            self.found.append(Diagnosis(
                "partial_window_scaled_by_k",
                f"a partial last window of {m} micro-batches is divided by k={k}: its update is "
                f"{c:.2f}× the exact one",
                f"with {m} of {k} micro-batches the update is {m}/{k} of the exact one "
                "(Lightning #19987, Accelerate): the tail is under-weighted",
                "divide by the window's own token count (or by len(micro_batches), never by "
                "accum_steps)", probe=name))
            return
        self.found.append(differs(name, g, exact_p))

    # ------------------------------------------------------------------------- cadence

    def scheduler(self) -> None:
        """Scheduler steps in the equal probe's window: exactly one."""
        if "scheduler" not in self.accepted:
            self.not_checked.append("scheduler cadence (step_fn takes no `scheduler`)")
            return
        mon = self.equal_mon
        if mon.error is None and mon.steps:
            finding = _scheduler_finding(mon, self.k, "equal", "")
            if finding is not None:
                self.found.append(finding)

    def clipping(self) -> None:
        """Clip the accumulated gradient once: max_grad_norm is 0.3× the function's own
        unclipped update, so a wrong scale is divided out."""
        g_eq = self.equal_mon.steps[0]
        max_norm = CLIP_FRACTION * float(g_eq.norm())
        mon = self.window("clipping", self.data["equal"], max_grad_norm=max_norm)
        self.probes["clipping"] = summarize(mon, self.k)
        problem = structure_finding(mon, self.k, "clipping")
        if problem is not None:
            self.found.append(problem)
            return
        g, clipped = mon.steps[0], g_eq * CLIP_FRACTION
        if float((g - clipped).norm() / clipped.norm()) >= self.tol:
            self.found.append(clip_finding(g, g_eq, max_norm, mon, self.k, self.tol))

    def next_window(self) -> None:
        """Two windows in a row: gradients cleared in between, the scheduler stepped again."""
        run = Run(self.step_fn, self.accepted, self.model, "next_window")
        first = self.window("next_window", self.data["equal"], run=run)
        exact_2, _ = exact_update(run.net, self.data["second"])
        second = self.window("next_window", self.data["second"], run=run)
        self.probes["next_window"] = summarize(second, self.k)
        if second.error is not None or len(second.steps) != 1 or not first.steps:
            return
        g2, g1 = second.steps[0], first.steps[0]
        if fit_scale(g2, exact_2)[1] >= self.tol:
            c_leak, resid_leak = fit_scale(g2 - g1, exact_2)
            if resid_leak < self.tol:
                self.found.append(Diagnosis(
                    "zero_grad_missing",
                    "gradients leak into the next window: zero_grad is never called",
                    "the second window's update equals its own gradient plus the whole first "
                    f"window's gradient (residual {resid_leak:.1e}); zero_grad ran "
                    f"{len(second.zero_grads)} times", "call optimizer.zero_grad() once per "
                    "window, after the step", probe="next_window"))
            else:
                self.found.append(differs("next_window", g2, exact_2))
        if "scheduler" in self.accepted and first.scheduler_steps == 1:
            finding = _scheduler_finding(second, self.k, "next_window", " in the second window")
            if finding is not None:
                self.found.append(finding)


def _scheduler_finding(mon: Monitor, k: int, probe: str, where: str) -> Diagnosis | None:
    n = mon.scheduler_steps
    if n > 1:
        return Diagnosis(
            "scheduler_every_micro_batch",
            f"the LR scheduler stepped {n} times in one window of {k} micro-batches{where}",
            f"scheduler.step() ran {n} times for {len(mon.steps)} optimizer step(s): the "
            f"schedule runs {n}× too fast (accelerate #963, diffusers #2632)",
            "step the scheduler once per optimizer step, and size it in optimizer steps",
            probe=probe)
    if n == 0:
        return Diagnosis(
            "scheduler_not_stepped", f"the LR scheduler was never stepped{where}",
            f"a scheduler was passed and scheduler.step() ran 0 times{where}",
            "call scheduler.step() once after optimizer.step()", probe=probe)
    return None


def _unshifted_ratio(batches: list[dict]) -> float:
    """Label tokens after the causal shift / labels before it (what an unshifted count gives)."""
    shifted = sum(num_items(b) for b in batches)
    return shifted / sum(int((b["labels"] != -100).sum()) for b in batches)
