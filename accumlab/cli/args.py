"""What every subcommand shares: the parser class, argument types, the exit codes.

Nothing here imports torch, so that `accumlab --help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

EXIT_OK, EXIT_FINDING, EXIT_USAGE = 0, 1, 2

EXIT_CODES = """exit codes (every subcommand):
  0  done, nothing to report
  1  a finding: `check` found a bug in your loop, or a run stopped on its own (a non-finite
     loss or gradient, out of memory, a damaged checkpoint, a stalled rank): one line says why
  2  a usage error: a bad option, file or setting (one line on stderr says what to change)
  3  an unexpected error (a traceback follows; set ACCUMLAB_DEBUG=1 to see one for any error)"""


class UsageError(Exception):
    """Bad input from the user: reported as one line and exit code 2, never a traceback."""


class RunStopped(Exception):
    """A run that stopped for a reason the engine explains: one line and exit code 1."""


class Formatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own, so that lists keep their lines."""

    def _fill_text(self, text, width, indent):
        lines = []
        for line in text.splitlines():
            lead = len(line) - len(line.lstrip())  # an indented list item: hang under its text
            lines.append(textwrap.fill(line, width, initial_indent=indent,
                                       subsequent_indent=indent + " " * (lead + 3 if lead else 0)))
        return "\n".join(lines)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `accumlab <cmd>: error: ...` and exit code 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(EXIT_USAGE)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def none_or(kind):
    """`kind`, or None for the word 'none'."""

    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def one_line(error: BaseException) -> str:
    """An exception's message on one line (errors from deep inside may span several)."""
    return " ".join(str(error).split()) or type(error).__name__
