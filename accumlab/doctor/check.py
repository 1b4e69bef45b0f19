"""`check_loop`: every probe in order, beside the exact reference (see `accumlab.doctor`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from accumlab.doctor import isolation
from accumlab.doctor.diagnoses import crashed_finding, float32_note, raised_finding, timeout_finding
from accumlab.doctor.exam import Exam
from accumlab.doctor.harness import FunctionExited, StopCheck, accepted_args, describe_error
from accumlab.doctor.probe import load_modules
from accumlab.doctor.report import CheckResult

PRECISIONS = {"float64": torch.float64, "float32": torch.float32}
FLOAT32_TOLERANCE = 1e-3  # a correct float32 loop lands within ~1e-7 here; room for other sums
DTYPE_WORDS = ("Double", "Float", "dtype", "scalar type", "float64", "float32")


def check_loop(step_fn: Callable, *, accum_steps: int = 4, seed: int = 0,
               tolerance: float = 1e-4, name: str | None = None, timeout: float | None = 60.0,
               isolate: str = "auto", precision: str = "auto") -> CheckResult:
    """Run `step_fn` (one accumulation window; see `accumlab.doctor`) beside the exact reference.

    Returns a CheckResult whose `ok` says whether every probe matched, and whose `diagnoses`
    name each problem with its evidence. `accum_steps` (k >= 2) is the window length given to
    your function; `tolerance` is the relative difference still called equal in float64
    (transformers' own loss is float32, hence 1e-4 rather than 1e-12). `precision` "auto" probes
    in float64 and, if your function raises a dtype error there, again in float32 (tolerance
    1e-3); "float64" or "float32" forces one. `timeout` (seconds, None for none) bounds the
    whole check: a function that never returns gives a `timed_out` diagnosis. `isolate` "fork"
    runs the check in a child process, "thread" in your process with a watchdog; "auto" forks
    on Linux (see `accumlab.doctor.isolation`). The caller's torch state is never changed.
    """
    if not isinstance(accum_steps, int) or accum_steps < 2:
        raise ValueError(f"accum_steps must be an integer >= 2, got {accum_steps!r}")
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto', 'float64' or 'float32', got {precision!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    isolation.choose(isolate)  # validates
    name = name or getattr(step_fn, "__name__", "step_fn")
    accepted = accepted_args(step_fn)

    def work(report):
        return _check(step_fn, accepted, accum_steps, seed, tolerance, name, precision, report)

    load_modules()
    outcome = isolation.run_guarded(work, timeout, isolate)
    if outcome.result is not None:
        return outcome.result
    result = outcome.snapshot or CheckResult(name, accum_steps, [], {}, [])
    if outcome.timed_out:
        stopped = timeout_finding(timeout, outcome.stage, outcome.isolated)
    else:
        stopped = crashed_finding(outcome.crashed, outcome.stage)
    result.diagnoses.insert(0, stopped)
    result.not_checked.append(f"the {outcome.stage} probe and every probe after it")
    return result


def _check(step_fn, accepted, k, seed, tol, name, precision, report) -> CheckResult:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is several times faster
    try:
        with torch.random.fork_rng(devices=[]):
            dtype = PRECISIONS.get(precision, torch.float64)
            run_tol = tol if dtype == torch.float64 else max(tol, FLOAT32_TOLERANCE)
            probes = Exam(step_fn, accepted, k, seed, run_tol, dtype, name, report)
            result = _run(probes)
            error = probes.first_error
            if precision == "auto" and error is not None and _dtype_error(error):
                tol32 = max(tol, FLOAT32_TOLERANCE)
                retry = Exam(step_fn, accepted, k, seed, tol32, torch.float32, name, report)
                result32 = _run(retry)
                if retry.first_error is None:
                    result32.diagnoses.append(float32_note(describe_error(error), tol32))
                    return result32
            return result
    finally:
        torch.set_num_threads(threads)


def _run(probes: Exam) -> CheckResult:
    """Every probe in order; a function that exits or is interrupted stops the rest."""
    try:
        probes.run_all()
    except FunctionExited as stop:
        probes.first_error = probes.first_error or stop.monitor.error
        probes.found.append(raised_finding(stop.monitor.error, stop.probe))
        probes.not_checked.append(f"every probe after the {stop.probe} probe (the function "
                                  "exited)")
    except StopCheck:
        raise
    return probes.result()


def _dtype_error(error: BaseException) -> bool:
    return isinstance(error, (RuntimeError, TypeError)) and any(
        word in str(error) for word in DTYPE_WORDS)

