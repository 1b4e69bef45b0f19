"""Launching a lab's worker in several CPU processes under torchrun, and reading back its report.

A lab module runs as `python -m <module> --out DIR ...` in each process; rank 0 saves a JSON
summary and the final parameters (`save_report`), and `launch_workers` returns both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def save_report(out_dir: str, stem: str, summary: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Rank 0 writes `<stem>.json` (the summary) and `<stem>.safetensors` (the parameters)."""
    from safetensors.torch import save_file

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out_dir) / f"{stem}.safetensors"))
    (Path(out_dir) / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")


def launch_workers(module: str, stem: str, out_dir: str, nproc: int, args: list[str],
                   timeout: float) -> dict:
    """Run `python -m module --out out_dir *args` in `nproc` processes; rank 0's report with
    its saved parameters under "params". A failed launch raises with the workers' stderr."""
    from safetensors.torch import load_file

    repo = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", module, "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((Path(out_dir) / f"{stem}.json").read_text())
    report["params"] = load_file(str(Path(out_dir) / f"{stem}.safetensors"))
    return report
