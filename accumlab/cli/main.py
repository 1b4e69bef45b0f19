"""The `accumlab` command line: train, demo, compare, check, plan.

Every subcommand is one small module with `add_parser` and `cmd_<name>` (train.py, demo.py,
compare.py, plan.py; `check` is below). This module and the parsers import no torch: help and
argument errors answer at once, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
import traceback

from accumlab import __version__
from accumlab.cli import compare, demo, plan, train
from accumlab.cli.args import (
    EXIT_CODES,
    EXIT_FINDING,
    EXIT_USAGE,
    Parser,
    RunStopped,
    UsageError,
    one_line,
)
from accumlab.cli.options import config_from_args

# what a user can get wrong: one line and exit code 2, no traceback
USER_ERRORS = (UsageError, ValueError, OSError)

__all__ = ["build_parser", "config_from_args", "main"]


def cmd_check(args) -> int:
    """Run a user's accumulation step function (file.py:function) through check_loop."""
    import importlib.util
    from pathlib import Path

    from accumlab.doctor import check_loop

    path, sep, func = args.target.rpartition(":")
    if not sep or not path or not func:
        raise ValueError(f"expected path/to/file.py:function, got {args.target!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    step_fn = getattr(module, func, None)
    if not callable(step_fn):
        raise ValueError(f"{path} defines no function named {func!r}")
    result = check_loop(step_fn, accum_steps=args.accum_steps, name=func)
    print(result)
    return 0 if result.ok else 1


def build_parser() -> Parser:
    """The argument parser of the `accumlab` command."""
    parser = Parser(prog="accumlab", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"accumlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    train.add_parser(sub)
    demo.add_parser(sub)
    compare.add_parser(sub)

    p = sub.add_parser("check", help="check your accumulation step function against the exact "
                                     "window update and name its bugs")
    p.add_argument("target", help="path/to/file.py:function, called as function(model, "
                                  "optimizer, micro_batches, accum_steps, *, scheduler=None, "
                                  "scaler=None, loss_fn=None, max_grad_norm=None)")
    p.add_argument("--accum-steps", type=int, default=4)
    p.set_defaults(func=cmd_check)

    plan.add_parser(sub)
    for p in sub.choices.values():
        p.epilog = EXIT_CODES
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `accumlab` console script; returns the exit code."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (RunStopped, *USER_ERRORS) as e:
        if os.environ.get("ACCUMLAB_DEBUG"):
            raise
        print(f"accumlab {args.command}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_FINDING if isinstance(e, RunStopped) else EXIT_USAGE
    except Exception:
        traceback.print_exc()
        return 3


if __name__ == "__main__":
    sys.exit(main())
