"""Wall time and peak memory of each lesson notebook, run top to bottom as a learner runs it.

    python benchmarks/notebook_resources.py                      # every notebooks/NN_*.ipynb
    python benchmarks/notebook_resources.py 03 07                # only these (name prefixes)

Each notebook runs in a fresh kernel through nbclient with the notebook's own default parameters,
which are also what CI runs (no notebook shrinks for CI). A cell that runs longer than
--timeout seconds (default 900) is reported as an error, so that one stuck kernel cannot hold up
the whole run (once, under heavy load, a run waited on an idle kernel for 9 minutes).
For each it reports:

- wall s: from starting the kernel to the end of the last cell (what a learner waits for);
- kernel peak MiB: the kernel process's peak resident set (VmHWM in /proc/<pid>/status, read
  after every cell, so it is exact, not sampled);
- with children MiB: the largest sum of resident sets of the kernel and its child processes
  (data-parallel workers, demo runs), sampled every --interval seconds, so it can miss a
  short peak. This is the figure to hold against a container limit such as Binder's.

It prints a table and writes JSON (default benchmarks/results/notebook_resources.json, rewritten
after every notebook, so an interrupted run keeps what finished). Timings depend on the machine
and its load: the JSON records the CPU count, the load average and the torch version.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import nbformat
import psutil
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "notebook_resources.json"
MIB = 2**20


def vm_hwm_bytes(pid: int) -> int:
    """Peak resident set (VmHWM) of a live process, in bytes; 0 if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident set of a process and all its descendants now, in bytes."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class Sampler(threading.Thread):
    """Samples the kernel tree's total resident set until stopped; keeps the maximum."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.pid, self.peak = interval, None, 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(self.interval):
            if self.pid:
                self.peak = max(self.peak, tree_rss_bytes(self.pid))


def run_notebook(path: Path, interval: float, timeout: int | None) -> dict:
    """Execute one notebook in a fresh kernel; return its wall time and peak memory."""
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    sampler = Sampler(interval)
    state = {"pid": None, "hwm": 0, "cells": []}

    def on_start(**_):
        state["pid"] = sampler.pid = client.km.provisioner.pid

    def on_cell(cell, cell_index, **_):
        hwm = vm_hwm_bytes(state["pid"])
        state["hwm"] = max(state["hwm"], hwm)
        sampler.peak = max(sampler.peak, tree_rss_bytes(state["pid"]))
        if cell.cell_type == "code":
            state["cells"].append({"cell": cell_index, "kernel_peak_mib": round(hwm / MIB, 1),
                                   "t_s": round(time.perf_counter() - start, 2)})

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            on_notebook_start=on_start, on_cell_executed=on_cell)
    sampler.start()
    start = time.perf_counter()
    error = None
    try:
        client.execute(env=env)
    except Exception as e:  # a failing cell: report it, keep the figures up to there
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    wall = time.perf_counter() - start
    sampler.stopped.set()
    sampler.join()
    return {"notebook": path.stem, "wall_s": round(wall, 1),
            "kernel_peak_mib": round(state["hwm"] / MIB, 1),
            "with_children_peak_mib": round(max(sampler.peak, state["hwm"]) / MIB, 1),
            "error": error, "cells": state["cells"]}


def machine() -> dict:
    """What the figures were measured on."""
    try:
        import torch

        torch_version = torch.__version__
        cuda = torch.cuda.is_available()
    except ImportError:
        torch_version, cuda = None, False
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch_version, "cuda": cuda, "load_average_start": os.getloadavg()}


def table(rows: list[dict]) -> str:
    """The results as aligned text."""
    lines = [f"{'notebook':<28} {'wall s':>8} {'kernel peak MiB':>16} {'with children MiB':>18}"]
    for r in rows:
        lines.append(f"{r['notebook']:<28} {r['wall_s']:>8.1f} {r['kernel_peak_mib']:>16,.0f} "
                     f"{r['with_children_peak_mib']:>18,.0f}"
                     + (f"  FAILED: {r['error']}" if r["error"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebook name prefixes (default: all lessons)")
    parser.add_argument("--interval", type=float, default=0.2,
                        help="seconds between samples of the kernel tree (default 0.2)")
    parser.add_argument("--timeout", type=int, default=900,
                        help="seconds a cell may run before it counts as failed (default 900)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    args = parser.parse_args(argv)

    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if args.names:
        paths = [p for p in paths if any(p.stem.startswith(n) for n in args.names)]
    if not paths:
        parser.error(f"no notebook matches {args.names}")
    report = {"machine": machine(), "results": []}
    for path in paths:
        print(f"running {path.name} ...", file=sys.stderr, flush=True)
        report["results"].append(run_notebook(path, args.interval, args.timeout))
        report["machine"]["load_average_end"] = os.getloadavg()
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report["results"]))
    print(f"\n{report['machine']['cpus']} CPUs, load average at start "
          f"{report['machine']['load_average_start'][0]:.2f}, at end "
          f"{report['machine']['load_average_end'][0]:.2f}; JSON: {args.json}")
    return 1 if any(r["error"] for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
