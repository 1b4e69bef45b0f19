"""Data parallelism on one machine: launch R CPU processes, count the gradient all-reduces.

`launch()` starts `torchrun --standalone --nproc_per_node=R -m accumlab.lab.parallel_lab ...` (gloo
on CPU), which trains a tiny float64 GPT-2 with `accumlab.train` once per experiment: every k
in `ks` with DDP's `no_sync` (accumlab's default) and the largest k once more without it. A DDP
communication hook counts the all-reduce calls and bytes of every optimizer step; rank 0 writes
them, the logged losses and the final parameters to `out_dir/parallel_lab.json` and
`.safetensors`, which `launch()` reads back. `single_process()` trains the same data in one
process with micro-batch R x micro x k and k = 1, the run the distributed one must equal.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m accumlab.lab.parallel_lab \
        --out /tmp/lab --micro 2 --ks 1,2,4 --steps 3
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence

import torch

from accumlab.engine.config import TrainConfig
from accumlab.engine.models import count_parameters, make_model
from accumlab.lab.torchrun import launch_workers, save_report

MAX_LENGTH = 32  # tokens per training example: tiny, so process start dominates


def lab_examples(n: int) -> list[dict]:
    """`n` variable-length causal-LM examples from the shipped corpus (at most 32 tokens)."""
    from accumlab.data.corpus import lm_examples
    from accumlab.data.tokenizer import load_tokenizer

    return lm_examples(load_tokenizer(), "train", max_length=MAX_LENGTH, limit=n)


def lab_model() -> torch.nn.Module:
    """The lab's model: tiny GPT-2 in float64, so that 'equal' means equal to ~1e-12."""
    return make_model("gpt2", "tiny", seed=0, dtype=torch.float64, max_positions=MAX_LENGTH)


def lab_config(micro: int, accum_steps: int, steps: int) -> TrainConfig:
    """Settings shared by the distributed runs and their single-process reference."""
    return TrainConfig(micro_batch_size=micro, accum_steps=accum_steps, max_steps=steps, lr=1e-2,
                       precision="fp64", shuffle=False, progress=False, device="cpu")


def examples_needed(ranks: int, micro: int, ks: Sequence[int], steps: int) -> int:
    """Examples for `steps` optimizer steps at the largest k (every run reads from the start)."""
    return ranks * micro * max(ks) * steps


class CommCounter:
    """accumlab.train callback: a DDP comm hook that counts all-reduces and bytes per step."""

    def __init__(self, use_no_sync: bool = True):
        self.use_no_sync = use_no_sync
        self.calls = self.bytes = 0
        self.per_step: list[dict] = []

    def on_train_begin(self, info):
        import torch.distributed as dist

        net, world = info["model"], dist.get_world_size()

        def hook(state, bucket):
            buffer = bucket.buffer()
            self.calls += 1
            self.bytes += buffer.numel() * buffer.element_size()
            fut = dist.all_reduce(buffer.div_(world), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        net.register_comm_hook(None, hook)
        if not self.use_no_sync:  # the bug to measure: every micro-batch all-reduces
            net.no_sync = contextlib.nullcontext

    def on_step_end(self, record):
        self.per_step.append({"all_reduces": self.calls, "bytes": self.bytes,
                              "items": record["items"], "loss": record["loss"]})
        self.calls = self.bytes = 0


def worker(out_dir: str, micro: int, ks: Sequence[int], steps: int) -> None:
    """Body of every rank: one training run per experiment, results written by rank 0."""
    import torch.distributed as dist

    from accumlab.engine import distributed
    from accumlab.engine.trainer import train

    torch.set_num_threads(1)
    distributed.init_from_env()
    world = dist.get_world_size()
    data = lab_examples(examples_needed(world, micro, ks, steps))
    runs, tensors = [], {}
    experiments = [(k, True) for k in ks] + [(max(ks), False)]
    for k, use_no_sync in experiments:
        model = lab_model()
        counter = CommCounter(use_no_sync)
        train(model, data, lab_config(micro, k, steps), callbacks=[counter])
        name = f"k{k}_{'no_sync' if use_no_sync else 'sync_every_micro_batch'}"
        runs.append({"name": name, "accum_steps": k, "no_sync": use_no_sync,
                     "steps": counter.per_step})
        tensors[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    if dist.get_rank() == 0:
        model = lab_model()
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        summary = {"world": world, "micro": micro, "ks": list(ks), "steps": steps,
                   "n_params": count_parameters(model), "grad_bytes": param_bytes,
                   "runs": runs}
        save_report(out_dir, "parallel_lab", summary, tensors)
    dist.barrier()
    dist.destroy_process_group()


def launch(out_dir: str, nproc: int = 2, micro: int = 2, ks: Sequence[int] = (1, 2, 4),
           steps: int = 3, timeout: float = 600) -> dict:
    """Run the experiments in `nproc` CPU processes under torchrun; returns rank 0's results.

    The dict holds `world`, `grad_bytes` (all gradients, bytes), `runs` (one per experiment,
    each with per-step `all_reduces`, `bytes`, `items`, `loss`) and `params` (final parameter
    vectors by run name).
    """
    args = ["--micro", str(micro), "--ks", ",".join(map(str, ks)), "--steps", str(steps)]
    return launch_workers("accumlab.lab.parallel_lab", "parallel_lab", out_dir, nproc, args,
                          timeout)


def single_process(ranks: int, micro: int, accum_steps: int, steps: int) -> dict:
    """The reference: one process, micro-batch ranks x micro x k, k = 1, the same data."""
    from accumlab.engine.trainer import train

    data = lab_examples(examples_needed(ranks, micro, [accum_steps], steps))
    model = lab_model()
    result = train(model, data, lab_config(ranks * micro * accum_steps, 1, steps))
    return {"losses": result.losses,
            "params": torch.cat([p.detach().flatten() for p in model.parameters()])}


def communication_table(report: dict) -> list[dict]:
    """Per run: all-reduces and bytes per optimizer step, label tokens and bytes per token."""
    rows = []
    for run in report["runs"]:
        steps = run["steps"]
        calls = sum(s["all_reduces"] for s in steps) / len(steps)
        sent = sum(s["bytes"] for s in steps) / len(steps)
        tokens = sum(s["items"] for s in steps) / len(steps)
        rows.append({"run": run["name"], "k": run["accum_steps"], "no_sync": run["no_sync"],
                     "all_reduces_per_step": calls, "bytes_per_step": sent,
                     "predicted_bytes_per_step": calls * report["grad_bytes"],
                     "tokens_per_step": tokens, "bytes_per_token": sent / tokens})
    return rows


def main(argv: list[str] | None = None) -> None:
    """Command line of the worker (run it under torchrun)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for rank 0's results")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size per rank")
    p.add_argument("--ks", default="1,2,4", help="accumulation steps to try, comma-separated")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run this under torchrun: python -m torch.distributed.run "
                         "--standalone --nproc_per_node=2 -m accumlab.lab.parallel_lab --out DIR")
    worker(args.out, args.micro, [int(k) for k in args.ks.split(",")], args.steps)


if __name__ == "__main__":
    main()
