"""Running the user's step function under watch: counted backward passes, optimizer and
scheduler steps, zero_grad and clipping calls, and the gradient each step saw."""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable

import torch

from accumlab.doctor.probe import LR, SCALER_SCALE, loss_fn
from accumlab.engine.gradients import gradient_vector

OPTIONAL_ARGS = ("scheduler", "scaler", "loss_fn", "max_grad_norm")


class Monitor:
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


class ProbeSGD(torch.optim.SGD):
    """SGD that tells the monitor when it steps or zeroes gradients."""

    def __init__(self, params, monitor: Monitor):
        super().__init__(params, lr=LR)
        self.monitor = monitor

    def step(self, closure=None):
        self.monitor.on_step()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        self.monitor.zero_grads.append(self.monitor.backwards)
        return super().zero_grad(set_to_none)


class ProbeScheduler(torch.optim.lr_scheduler.LambdaLR):
    """A constant schedule that counts its steps."""

    def __init__(self, optimizer: ProbeSGD):
        self.monitor = None
        super().__init__(optimizer, lambda step: 1.0)
        self.monitor = optimizer.monitor

    def step(self, *args, **kwargs):
        if self.monitor is not None:
            self.monitor.scheduler_steps += 1
        return super().step(*args, **kwargs)


def accepted_args(step_fn: Callable) -> set[str]:
    params = inspect.signature(step_fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(OPTIONAL_ARGS)
    return {p.name for p in params if p.name in OPTIONAL_ARGS}


def call_step(step_fn, accepted, net, opt, batches, k, monitor, **extra) -> Monitor:
    kwargs = {"loss_fn": loss_fn} if "loss_fn" in accepted else {}
    kwargs.update(probe_extras(accepted, opt))
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


def run_step(step_fn, accepted, model, batches, k, **extra) -> Monitor:
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    monitor = Monitor(net)
    opt = ProbeSGD(net.parameters(), monitor)
    return call_step(step_fn, accepted, net, opt, batches, k, monitor, **extra)


def probe_extras(accepted: set[str], opt: ProbeSGD) -> dict:
    """A counting constant-LR scheduler and a GradScaler (scale 1024, exact in float64),
    passed in every probe to a function that names them."""
    extra = {}
    if "scheduler" in accepted:
        extra["scheduler"] = ProbeScheduler(opt)
    if "scaler" in accepted:
        extra["scaler"] = torch.amp.GradScaler("cpu", init_scale=SCALER_SCALE,
                                               growth_interval=1_000_000)
    return extra


def summarize(mon: Monitor, n_micro: int) -> dict:
    return {"micro_batches": n_micro, "forwards": mon.forwards, "backwards": mon.backwards,
            "optimizer_steps": len(mon.steps), "zero_grads": len(mon.zero_grads),
            "scheduler_steps": mon.scheduler_steps, "clips": len(mon.clips),
            "error": describe_error(mon.error) if mon.error else None}


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
