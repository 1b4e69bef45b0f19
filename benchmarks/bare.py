"""Run a script or a module as on a bare GPU machine: ipywidgets, plotly and pandas hidden.

The device machines have torch and transformers but none of the notebook packages, so
`benchmarks/gpu_checks.sh` runs every Python command through this file, here and there alike:
an import of a hidden package fails and `importlib.util.find_spec` reports it absent, as if it
were not installed.

    python benchmarks/bare.py benchmarks/bench_frameworks.py --cpu-ci
    python benchmarks/bare.py -m pytest tests/test_gpu.py
"""

import os
import runpy
import sys

HIDDEN = ("ipywidgets", "plotly", "pandas")


def main() -> None:
    for name in HIDDEN:
        sys.modules[name] = None  # `import name` raises ImportError; find_spec gives None
    args = sys.argv[1:]
    if not args or (args[0] == "-m" and len(args) < 2):
        raise SystemExit(__doc__)
    if args[0] == "-m":
        sys.argv = [args[1], *args[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        sys.path.insert(0, os.path.dirname(os.path.abspath(args[0])))
        runpy.run_path(args[0], run_name="__main__")


if __name__ == "__main__":
    main()
