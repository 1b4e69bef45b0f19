"""`accumlab demo`: one tiny model trained as 1 x 32 and as 8 x 4 from the same initialisation.

Each run happens in its own process so that its peak memory (CUDA max allocated on a GPU, the
process's peak resident set on a CPU) belongs to that run alone. A run that fails sends its error
back; the parent never waits on a process that has died.
"""

from __future__ import annotations

import multiprocessing as mp
import queue as queues
import tempfile
import time
from pathlib import Path

from accumlab.cli.args import EXIT_OK, positive_int


def add_parser(sub) -> None:
    """The `demo` subcommand and its options."""
    p = sub.add_parser("demo", help="1 x 32 vs 8 x 4 on a tiny GPT-2, side by side",
                       description="Train one tiny GPT-2 as 1 micro-batch of 32 and as 8 "
                                   "micro-batches of 4 from the same initialisation, and print "
                                   "both loss curves and the largest parameter difference.")
    p.add_argument("--steps", type=positive_int, default=20, metavar="N",
                   help="optimizer steps of each run (default: 20)")
    p.add_argument("--max-length", type=positive_int, default=128, metavar="N",
                   help="tokens per sequence at most (default: 128)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    """Run both splits and print the side-by-side table."""
    print(format_demo(run_demo(steps=args.steps, max_length=args.max_length)))
    return EXIT_OK


def _examples(max_length: int, limit: int):
    from accumlab.data.corpus import lm_examples
    from accumlab.data.tokenizer import load_tokenizer

    return lm_examples(load_tokenizer(), split="train", max_length=max_length, limit=limit)


def _run(micro: int, accum: int, steps: int, max_length: int, seed: int, out: str, queue):
    try:
        queue.put(_train_one(micro, accum, steps, max_length, seed, out))
    except Exception as e:  # sent back so that the parent can say what went wrong
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _train_one(micro: int, accum: int, steps: int, max_length: int, seed: int, out: str):
    from safetensors.torch import save_model

    from accumlab.engine.config import TrainConfig
    from accumlab.engine.models import make_model
    from accumlab.engine.trainer import train

    data = _examples(max_length, limit=32 * steps)
    model = make_model("gpt2", "tiny", seed=seed, max_positions=max_length)
    cfg = TrainConfig(micro_batch_size=micro, accum_steps=accum, max_steps=steps, lr=3e-3,
                      warmup_steps=2, schedule="cosine", shuffle=True, seed=seed,
                      progress=False)
    start = time.perf_counter()
    result = train(model, data, cfg)
    seconds = time.perf_counter() - start
    save_model(model, out)
    return {"losses": result.losses, "seconds": seconds,
            "peak_memory_mb": result.history[-1]["peak_memory_mb"],
            "tokens_per_s": sum(r["tokens"] for r in result.history) / seconds}


def _result_of(proc, queue, name: str) -> dict:
    """The worker's result; raises if it sent an error or died without sending anything."""
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except queues.Empty:
            if not proc.is_alive():  # died without a word (killed, out of memory)
                raise RuntimeError(f"the {name} run died (exit code {proc.exitcode})") from None
    proc.join()
    if "error" in result:
        raise RuntimeError(f"the {name} run failed: {result['error']}")
    return result


def run_demo(steps: int = 20, max_length: int = 128, seed: int = 0) -> dict:
    """Train both splits; returns their loss curves, times, peak memory and the largest
    parameter difference."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    from safetensors.torch import load_file

    ctx = mp.get_context("spawn")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for micro, accum in ((32, 1), (4, 8)):
            out = str(Path(tmp) / f"{micro}x{accum}.safetensors")
            queue = ctx.Queue()
            proc = ctx.Process(target=_run, args=(micro, accum, steps, max_length, seed, out,
                                                  queue))
            proc.start()
            result = _result_of(proc, queue, f"{micro} x {accum}")
            result["params"] = load_file(out)
            runs[f"{micro}x{accum}"] = result
    a, b = runs["32x1"].pop("params"), runs["4x8"].pop("params")
    max_abs = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float(v.abs().max()) for v in a.values())
    return {"runs": runs, "max_param_diff": max_abs, "max_param": moved, "steps": steps}


def format_demo(report: dict) -> str:
    """The demo's side-by-side table as text."""
    import torch

    r1, r8 = report["runs"]["32x1"], report["runs"]["4x8"]
    lines = ["Same tiny GPT-2, same data, same initialisation; effective batch 32 sequences.",
             "", f"{'step':>5}  {'loss 1 x 32':>12}  {'loss 8 x 4':>12}  {'difference':>11}"]
    for i, (x, y) in enumerate(zip(r1["losses"], r8["losses"]), start=1):
        lines.append(f"{i:>5}  {x:>12.6f}  {y:>12.6f}  {y - x:>11.2e}")
    lines += [
        "",
        f"largest parameter difference after {report['steps']} steps: "
        f"{report['max_param_diff']:.2e} (largest parameter {report['max_param']:.2f})",
        "",
        f"{'run':>8}  {'time s':>8}  {'tokens/s':>10}  {'peak memory MiB':>16}",
        f"{'1 x 32':>8}  {r1['seconds']:>8.2f}  {r1['tokens_per_s']:>10,.0f}  "
        f"{r1['peak_memory_mb']:>16,.0f}",
        f"{'8 x 4':>8}  {r8['seconds']:>8.2f}  {r8['tokens_per_s']:>10,.0f}  "
        f"{r8['peak_memory_mb']:>16,.0f}",
        "",
        "Peak memory: " + ("CUDA max allocated." if torch.cuda.is_available() else
                           "peak resident set of each run's own process (includes ~0.5 GB "
                           "of libraries)."),
    ]
    return "\n".join(lines)
