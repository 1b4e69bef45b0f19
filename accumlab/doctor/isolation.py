"""Running the check so that the caller survives whatever the step function does.

Two ways, chosen by `isolate`:

- "fork" (the default on Linux): the check runs in a forked child process. The child is a copy
  of the caller, so a step function defined in a notebook or as a closure works (nothing is
  pickled but the result). An endless loop, even inside one C call, is killed at the time
  limit; sys.exit(), os._exit() or a crash end only the child; nothing the function changes
  (torch settings, globals, monkey-patches) reaches the caller. What the function prints is
  captured and printed by the caller afterwards. Works in Jupyter: the child only computes on
  the CPU and writes to a pipe. Forking a process that has initialised CUDA is fine as long as
  the child does not use CUDA (the probe runs on the CPU).
- "thread" (the default elsewhere: macOS, where forking a process that has loaded Apple's
  frameworks can crash, and Windows, which cannot fork): the check runs in the calling thread
  with a watchdog thread that raises a timeout in it after the limit. A runaway Python loop is
  stopped there; a function stuck inside one long C call (time.sleep, a blocking read) is only
  stopped when that call returns, and one that catches BaseException and carries on is not
  stopped. Torch's global settings are restored after every call.
  Pass isolate="fork" on macOS to use a child process anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from accumlab.doctor.harness import StopCheck

ISOLATION = ("auto", "fork", "thread")


class CheckTimeout(StopCheck):
    """Raised in the checking thread by the watchdog when the time limit passes."""


@dataclass
class Outcome:
    """How a guarded check ended: `result` when it finished, else the last `snapshot` it
    reported, the `stage` it was in and why it stopped (`timed_out` or `crashed`)."""

    result: object = None
    snapshot: object = None
    stage: str = "equal"
    timed_out: bool = False
    crashed: str = ""
    isolated: bool = False


def choose(isolate: str) -> str:
    """The isolation a call gets: "auto" means fork on Linux, a watchdog thread elsewhere."""
    if isolate not in ISOLATION:
        raise ValueError(f"isolate must be one of {ISOLATION}, got {isolate!r}")
    if isolate == "fork" and not hasattr(os, "fork"):
        raise ValueError("isolate='fork' needs os.fork (Linux or macOS); use 'thread'")
    if isolate == "auto":
        return "fork" if sys.platform.startswith("linux") else "thread"
    return isolate


def run_guarded(work: Callable, timeout: float | None, isolate: str = "auto") -> Outcome:
    """Run `work(report)` within `timeout` seconds; `report(snapshot, stage)` records progress."""
    if choose(isolate) == "fork":
        return _run_forked(work, timeout)
    return _run_watched(work, timeout)


# ----------------------------------------------------------------------------- watchdog thread


def _run_watched(work: Callable, timeout: float | None) -> Outcome:
    outcome = Outcome()

    def report(snapshot, stage):
        outcome.snapshot, outcome.stage = snapshot, stage

    if timeout is None:
        outcome.result = work(report)
        return outcome
    target = threading.get_ident()
    lock = threading.Lock()
    state = {"running": True, "fired": False}

    def fire():
        with lock:
            if state["running"]:
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target),
                                                           ctypes.py_object(CheckTimeout))

    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()
    try:
        try:
            outcome.result = work(report)
        finally:
            with lock:
                state["running"] = False
            timer.cancel()
            if state["fired"]:  # clear a timeout that was raised but not yet delivered
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(target), None)
    except CheckTimeout:
        outcome.result, outcome.timed_out = None, True
    return outcome


# ----------------------------------------------------------------------------- forked child


def _send(fd: int, message: tuple) -> None:
    data = pickle.dumps(message)
    data = struct.pack("!Q", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _child(work: Callable, fd: int) -> None:
    captured = io.StringIO()
    sys.stdout = sys.stderr = captured  # printed by the caller, never by the child
    logging.disable(logging.WARNING)  # handlers hold the caller's streams (a kernel's, say)

    def report(snapshot, stage):
        _send(fd, ("progress", snapshot, stage, captured.getvalue()))

    try:
        result = work(report)
        _send(fd, ("done", result, captured.getvalue()))
    except BaseException:  # a bug of the doctor itself: hand the traceback to the caller
        _send(fd, ("error", traceback.format_exc(), captured.getvalue()))


def _run_forked(work: Callable, timeout: float | None) -> Outcome:
    outcome = Outcome(isolated=True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()  # else the child would inherit and repeat buffered output
    read_fd, write_fd = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(read_fd)
            _child(work, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    deadline = None if timeout is None else time.monotonic() + timeout
    buffer, output, message = b"", "", None
    try:
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], wait)
            if not ready:
                outcome.timed_out = True
                break
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            while len(buffer) >= 8:
                size = struct.unpack("!Q", buffer[:8])[0]
                if len(buffer) < 8 + size:
                    break
                message, buffer = pickle.loads(buffer[8:8 + size]), buffer[8 + size:]
                if message[0] == "progress":
                    outcome.snapshot, outcome.stage, output = message[1:]
                else:
                    output = message[2]
    except BaseException:  # KeyboardInterrupt in the caller: stop the child, then re-raise
        _reap(pid, kill=True)
        raise
    finally:
        os.close(read_fd)
    status = _reap(pid, kill=outcome.timed_out)
    if output:
        sys.stdout.write(output)
    if message is not None and message[0] == "error":
        raise RuntimeError("check_loop failed inside its child process:\n" + message[1])
    if message is not None and message[0] == "done":
        outcome.result = message[1]
    elif not outcome.timed_out:
        outcome.crashed = _describe_status(status)
    return outcome


def _reap(pid: int, kill: bool) -> int:
    if kill:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while True:
        try:
            return os.waitpid(pid, 0)[1]
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"was killed by signal {sig} ({signal.Signals(sig).name})"
    return f"exited with status {os.WEXITSTATUS(status)} before reporting"
