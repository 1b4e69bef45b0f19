"""`accumlab check file.py:function`: the loop doctor on a step function in a file."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from accumlab.cli.args import EXIT_FINDING, EXIT_OK, UsageError, positive_int

IMPORT_NOTE = ("FILE is imported: its top-level code runs (as with `python FILE`, except under "
               "`if __name__ == \"__main__\":`), so put a training script's own work under that guard.")


def add_parser(sub) -> None:
    """The `check` subcommand and its options."""
    p = sub.add_parser(
        "check", help="check your accumulation step function against the exact window update "
                      "and name its bugs",
        description="Run FUNCTION, one accumulation window, on a tiny GPT-2 beside the exact "
                    "update (accumlab.check_loop) and name what is wrong. " + IMPORT_NOTE
                    + " The function runs in a child process (on Linux) and is stopped after "
                    "--timeout seconds; a timeout is reported as a finding (exit code 1).")
    p.add_argument("target", metavar="FILE.py:FUNCTION",
                   help="the file and the function in it, called as function(model, optimizer, "
                        "micro_batches, accum_steps, *, scheduler=None, scaler=None, "
                        "loss_fn=None, max_grad_norm=None)")
    p.add_argument("--accum-steps", type=positive_int, default=4, metavar="K",
                   help="micro-batches per window given to the function, at least 2 (default: 4)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="stop importing the file, or the check, after this long (default: 60)")
    p.set_defaults(func=cmd_check)


def cmd_check(args) -> int:
    """Import the file, check the function, print the result; exit 1 on a finding."""
    path, sep, func = args.target.rpartition(":")
    if not sep or not path or not func:
        raise UsageError(f"expected path/to/file.py:function, got {args.target!r}")
    if not Path(path).is_file():
        raise UsageError(f"no such file: {path}")
    if args.accum_steps < 2:
        raise UsageError(f"--accum-steps must be at least 2, got {args.accum_steps}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    print(f"accumlab check: importing {path} (its top-level code runs), then checking "
          f"{func} with k={args.accum_steps}, time limit {args.timeout:g} s", flush=True)
    step_fn = getattr(_import_file(path, args.timeout), func, None)
    if not callable(step_fn):
        raise UsageError(f"{path} defines no function named {func!r}")
    from accumlab.doctor import check_loop

    result = check_loop(step_fn, accum_steps=args.accum_steps, name=func, timeout=args.timeout)
    print(result)
    if "timed_out" in result.codes:
        print(f"accumlab check: {func} did not finish within {args.timeout:g} s and was "
              "stopped (see timed_out above)", file=sys.stderr)
    return EXIT_OK if result.ok else EXIT_FINDING


class ImportTimeout(Exception):
    """The file's top-level code ran past the time limit."""


def _import_file(path: str, timeout: float):
    """Import a file as a module, its top-level code stopped after `timeout` where the platform
    allows (SIGALRM in the main thread: Linux, macOS)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).resolve().parent))
    alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if alarm:
        def on_alarm(signum, frame):
            raise ImportTimeout

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        spec.loader.exec_module(module)
    except ImportTimeout:
        raise UsageError(f"importing {path} took longer than {timeout:g} s: its top-level code "
                         "does not finish; move it under `if __name__ == \"__main__\":`") from None
    except SystemExit as e:
        raise UsageError(f"importing {path} called sys.exit({e.code!r}) at top level; move "
                         "script code under `if __name__ == \"__main__\":`") from None
    except Exception as e:
        raise UsageError(f"importing {path} raised {type(e).__name__}: {e}") from None
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sys.path.pop(0)
    return module
