"""Running the user's step function under watch: counted backward passes, optimizer and
scheduler steps, zero_grad and clipping calls, the gradient each step used, and what the call
left behind (parameters moved, gradients still in .grad); global torch state is restored."""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Callable

import torch

from accumlab.doctor.probe import LR, SCALER_SCALE, loss_fn, param_vector
from accumlab.engine.gradients import gradient_vector

OPTIONAL_ARGS = ("scheduler", "scaler", "loss_fn", "max_grad_norm")


class StopCheck(BaseException):
    """Ends the whole check early (a time limit, or the function exited); never the user's."""


class FunctionExited(StopCheck):
    """The function raised SystemExit or KeyboardInterrupt: report it and run no more probes."""

    def __init__(self, monitor: Monitor, probe: str):
        super().__init__(probe)
        self.monitor, self.probe = monitor, probe


class Monitor:
    """Counts backward passes, optimizer/scheduler steps, zero_grad and clipping of one call."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.backwards = 0
        self.forwards = 0
        self.steps: list[torch.Tensor] = []  # the gradient each optimizer step used
        self.step_at: list[int] = []  # backward passes done when each step ran
        self.zero_grads: list[int] = []  # backward passes done at each zero_grad
        self.clips: list[int] = []  # backward passes done at each clip_grad_norm_
        self.scheduler_steps = 0
        self.error: BaseException | None = None
        self.returned = None
        self.moved = 0.0  # ||theta_before - theta_after|| / lr over the call
        self.grad_left: torch.Tensor | None = None  # .grad when the call returned

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
    """SGD (lr=1) that tells the monitor when it steps or zeroes gradients.

    A closure (`optimizer.step(closure)`, as Lightning's automatic optimisation passes) runs
    first, as in torch's own SGD, so the step is judged by the gradient it really used.
    """

    def __init__(self, params):
        super().__init__(params, lr=LR)
        self.monitor: Monitor | None = None

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.monitor.on_step()
        super().step()
        return loss

    def zero_grad(self, set_to_none: bool = True):
        self.monitor.zero_grads.append(self.monitor.backwards)
        return super().zero_grad(set_to_none)


class ProbeScheduler(torch.optim.lr_scheduler.LambdaLR):
    """A constant schedule that counts its steps into the optimizer's current monitor."""

    def __init__(self, optimizer: ProbeSGD):
        self.counting = False
        super().__init__(optimizer, lambda step: 1.0)
        self.counting = True

    def step(self, *args, **kwargs):
        if self.counting and self.optimizer.monitor is not None:
            self.optimizer.monitor.scheduler_steps += 1
        return super().step(*args, **kwargs)


def accepted_args(step_fn: Callable) -> set[str]:
    """The optional keyword arguments `step_fn` names (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(step_fn).parameters.values()
    except (TypeError, ValueError) as e:
        raise TypeError(f"check_loop needs a function, got {step_fn!r}") from e
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return set(OPTIONAL_ARGS)
    return {p.name for p in params if p.name in OPTIONAL_ARGS}


@contextlib.contextmanager
def torch_state_kept():
    """Restore the global torch state a step function may change: grad mode, default dtype and
    device, intra-op threads, deterministic algorithms, anomaly detection."""
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    device, threads = torch.get_default_device(), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    anomaly = torch.is_anomaly_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(grad)
        if torch.get_default_dtype() != dtype:
            torch.set_default_dtype(dtype)
        if torch.get_default_device() != device:  # None: no device context, as before
            torch.set_default_device(None if device == torch.device("cpu") else device)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled()) != (deterministic,
                                                                           warn_only):
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if torch.is_anomaly_enabled() != anomaly:
            torch.autograd.set_detect_anomaly(anomaly)


class Run:
    """One copy of the probe model with its optimizer, scheduler and scaler, through one or
    more consecutive windows (the scheduler and scaler persist, as in a training loop)."""

    def __init__(self, step_fn: Callable, accepted: set[str], model: torch.nn.Module,
                 probe: str):
        self.step_fn, self.accepted, self.probe = step_fn, accepted, probe
        self.net = copy.deepcopy(model)
        self.net.zero_grad(set_to_none=True)
        self.opt = ProbeSGD(self.net.parameters())
        self.extras = probe_extras(accepted, self.opt)

    def window(self, batches: list[dict], k: int, **extra) -> Monitor:
        """Call the step function on one window; StopCheck if it exits or is interrupted."""
        monitor = Monitor(self.net)
        self.opt.monitor = monitor
        kwargs = {"loss_fn": loss_fn} if "loss_fn" in self.accepted else {}
        kwargs.update(self.extras)
        kwargs.update({name: value for name, value in extra.items() if name in self.accepted})
        batches = [{key: t.clone() for key, t in b.items()} for b in batches]
        before = param_vector(self.net)
        with monitor.watching(), warnings.catch_warnings(), torch_state_kept():
            warnings.simplefilter("ignore")
            try:
                monitor.returned = self.step_fn(self.net, self.opt, batches, k, **kwargs)
            except StopCheck:
                raise
            except BaseException as e:  # the user's code, sys.exit() included: report it
                monitor.error = e
        monitor.moved = float((before - param_vector(self.net)).norm()) / LR
        monitor.grad_left = gradient_vector(self.net)
        if isinstance(monitor.error, (SystemExit, KeyboardInterrupt)):
            raise FunctionExited(monitor, self.probe)
        return monitor


def run_step(step_fn, accepted, model, batches, k, probe: str = "", **extra) -> Monitor:
    """One window on a fresh copy of `model` (see Run)."""
    return Run(step_fn, accepted, model, probe).window(batches, k, **extra)


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
    if isinstance(e, SystemExit):
        return f"SystemExit: sys.exit({e.code!r}) was called"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
