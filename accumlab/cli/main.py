"""The `accumlab` command line: train, demo, compare, check, plan.

Every subcommand is one small module with `add_parser` and `cmd_<name>` (train.py, demo.py,
compare.py, check.py, plan.py). This module and the parsers import no torch: help and
argument errors answer at once, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import os
import sys
import traceback

from accumlab import __version__
from accumlab.cli import check, compare, demo, plan, train
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


def build_parser() -> Parser:
    """The argument parser of the `accumlab` command."""
    parser = Parser(prog="accumlab", description=__doc__.split("\n\n")[0], epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"accumlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    train.add_parser(sub)
    demo.add_parser(sub)
    compare.add_parser(sub)

    check.add_parser(sub)
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
