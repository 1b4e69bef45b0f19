"""The `accumlab` command line: train, demo, compare, check, plan."""

from accumlab.cli.main import build_parser, config_from_args, main

__all__ = ["build_parser", "config_from_args", "main"]
