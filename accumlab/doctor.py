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
(`accumlab.window`) and returns a `CheckResult`: `.ok`, and `.diagnoses`, each a named finding
with its evidence. Why SGD: Adam's first update is about lr * sign(gradient), whatever the
gradient's scale, so Adam hides a loss that is k times too large; SGD's update is the gradient
itself.
"""

from __future__ import annotations

import contextlib
import copy
import html
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .collate import pad_collate
from .equivalence import gradient_vector
from .losses import count_items, summed_loss
from .window import accumulate_gradients

TASK = "causal_lm"
VOCAB = 64
LR = 1.0
SCALER_SCALE = 1024.0
CLIP_FRACTION = 0.3  # the clipping probe sets max_grad_norm to this fraction of the exact norm
OPTIONAL_ARGS = ("scheduler", "scaler", "loss_fn", "max_grad_norm")


# ----------------------------------------------------------------------------- results
@dataclass
class Diagnosis:
    """One named finding: `code` is stable (tests use it), `title` states it with numbers."""

    code: str
    title: str
    evidence: str
    fix: str = ""
    severity: str = "bug"  # "bug" (the update or its cadence is wrong), "warning" or "note"
    probe: str = ""

    def __str__(self) -> str:
        mark = {"bug": "✗", "warning": "!", "note": "i"}[self.severity]
        text = f"{mark} [{self.code}] {self.title}\n    evidence: {self.evidence}"
        return text + (f"\n    fix: {self.fix}" if self.fix else "")


@dataclass
class CheckResult:
    """What `check_loop` found. `ok` is True when no finding is a bug."""

    name: str
    accum_steps: int
    diagnoses: list[Diagnosis]
    probes: dict[str, dict] = field(default_factory=dict)
    not_checked: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(d.severity == "bug" for d in self.diagnoses)

    @property
    def codes(self) -> list[str]:
        """The codes of the bugs found (warnings and notes left out)."""
        return [d.code for d in self.diagnoses if d.severity == "bug"]

    def summary(self) -> str:
        """One line: 'correct' or the bug titles."""
        if self.ok:
            return "correct"
        return "; ".join(d.title for d in self.diagnoses if d.severity == "bug")

    def __str__(self) -> str:
        head = (f"check_loop({self.name}): k={self.accum_steps}, tiny GPT-2 in float64, SGD lr=1, "
                f"probes: {', '.join(self.probes)}")
        if self.ok:
            lines = [head, "correct: every probe matches the exact window update."]
        else:
            n = len(self.codes)
            lines = [head, f"{n} problem{'s' if n > 1 else ''} found:"]
        lines += [str(d) for d in self.diagnoses]
        if self.not_checked:
            lines.append("not checked: " + "; ".join(self.not_checked))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"CheckResult(ok={self.ok}, codes={self.codes})"

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.ok else "#cf222e"
        verdict = "correct" if self.ok else f"{len(self.codes)} problem(s) found"
        rows = "".join(
            f"<li><b>{html.escape(d.code)}</b> — {html.escape(d.title)}<br>"
            f"<small>evidence: {html.escape(d.evidence)}"
            + (f"<br>fix: {html.escape(d.fix)}" if d.fix else "") + "</small></li>"
            for d in self.diagnoses)
        extra = ("<p><small>not checked: " + html.escape("; ".join(self.not_checked))
                 + "</small></p>") if self.not_checked else ""
        return (f"<div><p><code>check_loop({html.escape(self.name)})</code>, "
                f"k={self.accum_steps}: <b style='color:{colour}'>{verdict}</b></p>"
                f"<ul>{rows}</ul>{extra}</div>")


# ----------------------------------------------------------------------------- fixed data
def make_probe_model(seed: int = 0) -> torch.nn.Module:
    """The tiny float64 GPT-2 the probes run on (1 layer, width 32, vocabulary 64)."""
    from .models import make_model

    model = make_model("gpt2", "tiny", seed=seed, dtype=torch.float64, vocab_size=VOCAB,
                       max_positions=64, n_layer=1, n_embd=32, n_head=2)
    model.eval()  # dropout is 0 anyway; eval() also makes the model deterministic
    return model


def _sequences(lengths: list[int], gen: torch.Generator) -> list[dict]:
    out = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def probe_windows(k: int, seed: int = 0) -> dict[str, list[dict]]:
    """Fixed micro-batches: `equal` (same token count each), `unequal`, `partial`, `second`."""
    gen = torch.Generator().manual_seed(seed)
    pattern = [(24, 20), (4,), (12, 3), (6, 5, 3)]  # label tokens per micro-batch: 42, 3, 13, 11
    return {
        "equal": [pad_collate(_sequences([9, 9], gen)) for _ in range(k)],
        "unequal": [pad_collate(_sequences(list(pattern[j % 4]), gen)) for j in range(k)],
        "partial": [pad_collate(_sequences([9, 9], gen)) for _ in range(max(1, k // 2))],
        "second": [pad_collate(_sequences([9, 9], gen)) for _ in range(k)],
    }


def num_items(batch: dict) -> int:
    """Label tokens of a causal-LM micro-batch after the shift (what the exact loss counts)."""
    return count_items(batch["labels"], TASK)


def loss_fn(model: torch.nn.Module, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The micro-batch's mean token loss (`reduction="mean"`) or summed token loss ("sum")."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = summed_loss(logits, batch["labels"], TASK)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(num_items(batch), 1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _exact(model: torch.nn.Module, batches: list[dict], normalization: str = "tokens"):
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mean_of_means warns about unequal counts: we know
        loss = accumulate_gradients(net, batches, task=TASK, normalization=normalization)
    return gradient_vector(net), loss


def _param_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- instruments
class _Monitor:
    """Counts backward passes, optimizer/scheduler steps, zero_grad and clipping of one call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.backwards = 0
        self.forwards = 0
        self.steps: list[torch.Tensor] = []  # the gradient each optimizer step saw
        self.step_at: list[int] = []  # backward passes done when each step ran
        self.zero_grads: list[int] = []  # backward passes done at each zero_grad
        self.clips: list[int] = []  # backward passes done at each clip_grad_norm_
        self.scheduler_steps = 0
        self.error: BaseException | None = None
        self.returned = None

    def on_step(self) -> None:
        self.steps.append(gradient_vector(self.model))
        self.step_at.append(self.backwards)

    @contextlib.contextmanager
    def watching(self):
        import torch.nn.utils as nn_utils

        original_backward = torch.autograd.backward
        original_clip = nn_utils.clip_grad_norm_
        original_zero = self.model.zero_grad
        monitor = self

        def backward(*args, **kwargs):
            monitor.backwards += 1
            return original_backward(*args, **kwargs)

        def clip(*args, **kwargs):
            monitor.clips.append(monitor.backwards)
            return original_clip(*args, **kwargs)

        def zero_grad(*args, **kwargs):
            monitor.zero_grads.append(monitor.backwards)
            return original_zero(*args, **kwargs)

        def count_forward(module, args, output):
            monitor.forwards += 1

        hook = self.model.register_forward_hook(count_forward)
        torch.autograd.backward = backward
        nn_utils.clip_grad_norm_ = clip
        self.model.zero_grad = zero_grad
        try:
            yield self
        finally:
            torch.autograd.backward = original_backward
            nn_utils.clip_grad_norm_ = original_clip
            del self.model.zero_grad
            hook.remove()


class _ProbeSGD(torch.optim.SGD):
    """SGD that tells the monitor when it steps or zeroes gradients."""

    def __init__(self, params, monitor: _Monitor):
        super().__init__(params, lr=LR)
        self.monitor = monitor

    def step(self, closure=None):
        self.monitor.on_step()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.monitor.zero_grads.append(self.monitor.backwards)
        return super().zero_grad(set_to_none)


class _ProbeScheduler(torch.optim.lr_scheduler.LambdaLR):
    """A constant schedule that counts its steps."""

    def __init__(self, optimizer: _ProbeSGD):
        self.monitor = None
        super().__init__(optimizer, lambda step: 1.0)
        self.monitor = optimizer.monitor

    def step(self, *args, **kwargs):
        if self.monitor is not None:
            self.monitor.scheduler_steps += 1
        return super().step(*args, **kwargs)


def _accepted(step_fn: Callable) -> set[str]:
    params = inspect.signature(step_fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(OPTIONAL_ARGS)
    return {p.name for p in params if p.name in OPTIONAL_ARGS}


def _call(step_fn, accepted, net, opt, batches, k, monitor, **extra) -> _Monitor:
    kwargs = {"loss_fn": loss_fn} if "loss_fn" in accepted else {}
    kwargs.update(_extras(accepted, opt))
    kwargs.update({name: value for name, value in extra.items() if name in accepted})
    batches = [{key: t.clone() for key, t in b.items()} for b in batches]
    opt.monitor = monitor
    with monitor.watching(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            monitor.returned = step_fn(net, opt, batches, k, **kwargs)
        except Exception as e:  # the user's code: report it, never crash the check
            monitor.error = e
    return monitor


def _run(step_fn, accepted, model, batches, k, **extra) -> _Monitor:
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    monitor = _Monitor(net)
    opt = _ProbeSGD(net.parameters(), monitor)
    return _call(step_fn, accepted, net, opt, batches, k, monitor, **extra)


def _extras(accepted: set[str], opt: _ProbeSGD) -> dict:
    """A counting constant-LR scheduler and a GradScaler (scale 1024, exact in float64),
    passed in every probe to a function that names them."""
    extra = {}
    if "scheduler" in accepted:
        extra["scheduler"] = _ProbeScheduler(opt)
    if "scaler" in accepted:
        extra["scaler"] = torch.amp.GradScaler("cpu", init_scale=SCALER_SCALE,
                                               growth_interval=1_000_000)
    return extra


# ----------------------------------------------------------------------------- analysis
def _fit(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Best scale c with g ~ c * ref, and the relative residual ||g - c ref|| / ||g||."""
    denom = float(ref @ ref)
    if denom == 0.0 or float(g.norm()) == 0.0:
        return 0.0, math.inf
    c = float(g @ ref) / denom
    return c, float((g - c * ref).norm() / g.norm())


def _close(a: float, b: float, tol: float) -> bool:
    return abs(a - b) <= tol * max(abs(a), abs(b))


def _describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _structure(mon: _Monitor, n_micro: int, probe: str) -> Diagnosis | None:
    """Findings that make the numbers meaningless: an exception, no step, several steps."""
    if mon.error is not None:
        msg = str(mon.error)
        if "does not require grad" in msg or "does not have a grad_fn" in msg:
            return Diagnosis(
                "detached_loss",
                "no gradient flows: the loss was detached (.item(), .detach() or a new tensor) "
                "before backward",
                f"in the {probe} probe your function raised {_describe_error(mon.error)}",
                "accumulate the loss tensors themselves (or call backward on each micro-batch's "
                "loss); use .item() only for logging", probe=probe)
        return Diagnosis("function_raised", f"your function raised {type(mon.error).__name__}",
                         f"in the {probe} probe: {_describe_error(mon.error)}", probe=probe)
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


def _scale_finding(c: float, k: int, probe: str, scaler: bool, tol: float) -> Diagnosis | None:
    if _close(c, 1.0, tol):
        return None
    title_scale = f"your update is {c:.2f}× the exact one"
    if _close(c, float(k), tol):
        return Diagnosis(
            "loss_not_scaled",
            f"{title_scale}: the loss is not divided by the number of accumulation steps",
            f"with k={k} micro-batches of equal token counts the update points exactly the "
            f"exact way, {c:.4f} times as long",
            "divide each micro-batch's loss by k (or, better, sum token losses and divide by "
            "the window's token count)", probe=probe)
    if _close(c, 1.0 / k, tol):
        return Diagnosis(
            "loss_scaled_twice",
            f"{title_scale}: the loss is divided by k twice",
            f"the update has the exact direction and 1/{k} of its length",
            "divide once (a framework like Accelerate or DeepSpeed may already divide by k)",
            probe=probe)
    if scaler and _close(c, SCALER_SCALE, tol):
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


def _match_update(g, candidates: dict[str, torch.Tensor], tol: float):
    """Name of the first candidate that g is a multiple of, with its scale."""
    for name, ref in candidates.items():
        c, resid = _fit(g, ref)
        if resid < tol and c > 0:
            return name, c
    return None, None


def check_loop(step_fn: Callable, *, accum_steps: int = 4, seed: int = 0,
               tolerance: float = 1e-4, name: str | None = None) -> CheckResult:
    """Run `step_fn` (one accumulation window; see the module doc) beside the exact reference.

    Returns a CheckResult whose `ok` says whether every probe matched, and whose `diagnoses`
    name each problem with its evidence. `accum_steps` (k >= 2) is the window length given to
    your function; `tolerance` is the relative difference still called equal (the models run in
    float64; transformers' own loss is float32, hence 1e-4 rather than 1e-12).
    """
    if not isinstance(accum_steps, int) or accum_steps < 2:
        raise ValueError(f"accum_steps must be an integer >= 2, got {accum_steps!r}")
    k, tol = accum_steps, tolerance
    name = name or getattr(step_fn, "__name__", "step_fn")
    accepted = _accepted(step_fn)
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
        exact, exact_loss = _exact(model, data["equal"])
        per_mb = [_exact(model, [b])[0] for b in data["equal"]]
        mon = equal_mon = _run(step_fn, accepted, model, data["equal"], k)
        probes["equal"] = _summary(mon, k)
        problem = _structure(mon, k, "equal")
        scale = None
        if problem is not None:
            found.append(problem)
        else:
            g = mon.steps[0]
            c, resid = _fit(g, exact)
            probes["equal"]["scale"] = c
            if resid < tol:
                scale = c
                finding = _scale_finding(c, k, "equal", "scaler" in accepted, tol)
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
                label, c_last = _match_update(g, {"last": per_mb[-1]}, tol)
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
                    found.append(_differs("equal", g, exact))
        if mon.returned is not None and problem is None:
            logged = _logged_loss_finding(mon.returned, exact_loss, data["equal"], model, k)
            if logged:
                found.append(logged)

        direction_ok = scale is not None
        scale_ok = direction_ok and _close(scale, 1.0, tol)
        if not direction_ok:
            not_checked.append("unequal token counts, partial window, clipping, scaler and "
                               "next-window probes (fix the window's basic update first)")

        # 2. unequal token counts: mean of means
        if direction_ok:
            exact_u, _ = _exact(model, data["unequal"])
            mom_u, _ = _exact(model, data["unequal"], normalization="mean_of_means")
            mon = _run(step_fn, accepted, model, data["unequal"], k)
            probes["unequal"] = _summary(mon, k)
            counts = [num_items(b) for b in data["unequal"]]
            problem = _structure(mon, k, "unequal")
            if problem is not None:
                found.append(problem)
            else:
                g = mon.steps[0]
                c, resid = _fit(g, exact_u)
                if resid >= tol:
                    c_m, resid_m = _fit(g, mom_u)
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
                        found.append(_differs("unequal", g, exact_u))

        # 3. partial last window
        if scale_ok:
            m = len(data["partial"])
            exact_p, _ = _exact(model, data["partial"])
            mon = _run(step_fn, accepted, model, data["partial"], k)
            probes["partial"] = _summary(mon, m)
            if mon.error is None and not mon.steps and mon.backwards > 0:
                found.append(Diagnosis(
                    "partial_window_not_stepped",
                    f"a partial last window ({m} of {k} micro-batches) is never stepped",
                    f"{mon.backwards} backward passes and no optimizer step: the tail's "
                    "gradients are lost, or leak into the next epoch's first window",
                    "step after the last micro-batch of the window, whatever its length",
                    probe="partial"))
            else:
                problem = _structure(mon, m, "partial")
                if problem is not None:
                    found.append(problem)
                else:
                    g = mon.steps[0]
                    c, resid = _fit(g, exact_p)
                    if resid < tol and _close(c, m / k, tol):
                        found.append(Diagnosis(
                            "partial_window_scaled_by_k",
                            f"a partial last window of {m} micro-batches is divided by k={k}: "
                            f"its update is {c:.2f}× the exact one",
                            f"with {m} of {k} micro-batches the update is {m}/{k} of the exact "
                            "one (Lightning #19987, Accelerate): the tail is under-weighted",
                            "divide by the window's own token count (or by len(micro_batches), "
                            "never by accum_steps)", probe="partial"))
                    elif resid >= tol or not _close(c, 1.0, tol):
                        found.append(_differs("partial", g, exact_p))

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
            mon = _run(step_fn, accepted, model, data["equal"], k, max_grad_norm=max_norm)
            probes["clipping"] = _summary(mon, k)
            problem = _structure(mon, k, "clipping")
            if problem is not None:
                found.append(problem)
            else:
                g = mon.steps[0]
                clipped = exact * CLIP_FRACTION
                if float((g - clipped).norm() / clipped.norm()) >= tol:
                    found.append(_clip_finding(g, exact, max_norm, mon, k, tol))
        elif "max_grad_norm" not in accepted:
            not_checked.append("clipping (step_fn takes no `max_grad_norm`)")

        if "scaler" not in accepted:
            not_checked.append("GradScaler (step_fn takes no `scaler`)")

        # 7. the next window: are gradients cleared between windows?
        if direction_ok:
            net = copy.deepcopy(model)
            net.zero_grad(set_to_none=True)
            first = _Monitor(net)
            opt = _ProbeSGD(net.parameters(), first)
            _call(step_fn, accepted, net, opt, data["equal"], k, first)
            after_first = copy.deepcopy(net)
            after_first.zero_grad(set_to_none=True)
            exact_2, _ = _exact(after_first, data["second"])
            second = _Monitor(net)
            _call(step_fn, accepted, net, opt, data["second"], k, second)
            probes["next_window"] = _summary(second, k)
            if second.error is None and len(second.steps) == 1 and first.steps:
                g2, g1 = second.steps[0], first.steps[0]
                c, resid = _fit(g2, exact_2)
                if resid >= tol:
                    c_leak, resid_leak = _fit(g2 - g1, exact_2)
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
                        found.append(_differs("next_window", g2, exact_2))


def _dedupe(found: list[Diagnosis]) -> list[Diagnosis]:
    seen, out = set(), []
    for d in found:
        if d is not None and d.code not in seen:
            seen.add(d.code)
            out.append(d)
    return out


def _summary(mon: _Monitor, n_micro: int) -> dict:
    return {"micro_batches": n_micro, "forwards": mon.forwards, "backwards": mon.backwards,
            "optimizer_steps": len(mon.steps), "zero_grads": len(mon.zero_grads),
            "scheduler_steps": mon.scheduler_steps, "clips": len(mon.clips),
            "error": _describe_error(mon.error) if mon.error else None}


def _differs(probe: str, g: torch.Tensor, ref: torch.Tensor) -> Diagnosis:
    rel = float((g - ref).norm() / ref.norm())
    cos = float(g @ ref / (g.norm() * ref.norm()))
    return Diagnosis(
        "update_differs", f"the update differs from the exact one ({probe} probe)",
        f"relative difference {rel:.2e}, cosine {cos:.4f}, length ratio "
        f"{float(g.norm() / ref.norm()):.3f}; no known pattern matches",
        "compare with accumlab.window: sum of token losses / window token count, one step",
        probe=probe)


def _clip_finding(g, exact, max_norm, mon: _Monitor, k: int, tol: float) -> Diagnosis:
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
    return _differs("clipping", g, exact * (max_norm / float(exact.norm())))


def _logged_loss_finding(returned, exact_loss: float, batches, model, k) -> Diagnosis | None:
    try:
        value = float(returned.detach() if isinstance(returned, torch.Tensor) else returned)
    except (TypeError, ValueError):
        return None
    if _close(value, exact_loss, 1e-4):
        return None
    last = float(loss_fn(model, batches[-1]).detach())
    label = "none of the usual mistakes"
    for name, candidate in ((f"the last micro-batch's loss × {k}", last * k),
                             ("the last micro-batch's loss", last),
                             (f"the last micro-batch's loss / {k}", last / k),
                             (f"{k}× the window loss", exact_loss * k)):
        if _close(value, candidate, 1e-4):
            label = name
            break
    return Diagnosis(
        "logged_loss_wrong", f"the returned (logged) loss {value:.4f} is not the window loss "
        f"{exact_loss:.4f}", f"it equals {label}",
        "log the window's loss: sum of token losses / token count (Lightning #2569, "
        "transformers #35204)", severity="warning", probe="equal")


def probe_reference(accum_steps: int = 4, seed: int = 0) -> dict:
    """The fixed probe data with its exact window gradients (for notebooks and tests)."""
    model = make_probe_model(seed)
    data = probe_windows(accum_steps, seed)
    return {name: {"micro_batches": batches, "items": [num_items(b) for b in batches],
                   "exact_gradient": _exact(model, batches)[0]}
            for name, batches in data.items()} | {"model": model}
