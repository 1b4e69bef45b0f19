"""Sharding on one machine: R CPU processes train with DDP and with FSDP2; count what each rank
holds and sends.

`launch()` starts `torchrun --standalone --nproc_per_node=R -m accumlab.lab.sharding_lab ...`
(gloo on CPU). Each rank trains a tiny float32 GPT-2 with `accumlab.train` three times on the
same data: `parallel="ddp"`, `parallel="fsdp"` (gradient sync skipped on the first k-1
micro-batches) and `parallel="fsdp", sync_every_micro_batch=True`. A callback counts the
collectives of every window (DDP's all-reduces through a communication hook, FSDP's
all-gathers and reduce-scatters through `accumlab.engine.fsdp.count_collectives`) and reads the
bytes of weights, gradients and optimizer state this rank holds: before each micro-batch's
forward (what the previous backward left) and just before the optimizer step. Rank 0 writes
every rank's numbers and the final parameters to `out_dir`.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m accumlab.lab.sharding_lab \
        --out /tmp/shard --micro 2 --k 4 --steps 2

The rest is arithmetic for models of any size: model-state bytes per rank under DDP and ZeRO
stages 1-3, and bytes each rank sends per window under DDP and FSDP (`trade_off`).
"""

from __future__ import annotations

import argparse
import os

import torch

from accumlab.engine import fsdp
from accumlab.engine.config import TrainConfig
from accumlab.engine.models import count_parameters, make_model
from accumlab.lab.torchrun import launch_workers, save_report

MAX_LENGTH = 32  # tokens per example: tiny, so process start dominates
RUNS = {"ddp": {"parallel": "ddp"}, "fsdp": {"parallel": "fsdp"},
        "fsdp_sync_every": {"parallel": "fsdp", "sync_every_micro_batch": True}}
ADAMW_STATES = ("exp_avg", "exp_avg_sq")  # the moments; the step counter is one number


def lab_model() -> torch.nn.Module:
    """Tiny GPT-2 in float32: 4 bytes of weight, 4 of gradient and 8 of AdamW state each."""
    return make_model("gpt2", "tiny", seed=0, max_positions=MAX_LENGTH)


def lab_config(micro: int, k: int, steps: int, **parallel) -> TrainConfig:
    return TrainConfig(micro_batch_size=micro, accum_steps=k, max_steps=steps, lr=1e-3,
                       shuffle=False, progress=False, device="cpu", **parallel)


def moment_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of AdamW's two moments that this rank holds (its shards under FSDP)."""
    return fsdp.local_bytes(s[name] for s in optimizer.state.values() for name in ADAMW_STATES
                            if name in s)


class ShardMeter:
    """accumlab.train callback: collectives and bytes held by this rank, per window."""

    def on_train_begin(self, info):
        import torch.distributed as dist

        self.model, self.optimizer, self.windows = info["model"], info["optimizer"], []
        self.held, self.at_step = [], None
        self.calls = {"all_reduces": 0, "all_reduce_bytes": 0}
        if fsdp.is_sharded(self.model):
            self.counts = fsdp.count_collectives(self.model)
        else:
            self.counts = self.calls
            world = dist.get_world_size()

            def hook(state, bucket):
                buffer = bucket.buffer()
                self.calls["all_reduces"] += 1
                self.calls["all_reduce_bytes"] += buffer.numel() * buffer.element_size()
                fut = dist.all_reduce(buffer.div_(world), async_op=True).get_future()
                return fut.then(lambda f: f.value()[0])

            self.model.register_comm_hook(None, hook)
        self.model.register_forward_pre_hook(
            lambda module, args: self.held.append(fsdp.gradient_bytes(self.model)))
        self.optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs):
        self.at_step = fsdp.gradient_bytes(self.model)

    def on_step_end(self, entry):
        counts = {k: v for k, v in self.counts.items() if k != "groups"}
        self.windows.append({**counts, "items": entry["items"], "loss": entry["loss"],
                             "gradient_between_micro_batches": max(self.held[1:], default=0),
                             "gradient_at_step": self.at_step})
        self.held = []
        for key in counts:
            self.counts[key] = 0

    def summary(self) -> dict:
        model = self.model
        blocks = fsdp.transformer_blocks(model)
        return {"windows": self.windows, "weights": fsdp.weight_bytes(model),
                "optimizer_moments": moment_bytes(self.optimizer),
                "groups": len(blocks) + 1 if fsdp.is_sharded(model) else 0}


def worker(out_dir: str, micro: int, k: int, steps: int) -> None:
    """Body of every rank: the three runs, every rank's numbers gathered on rank 0."""
    import torch.distributed as dist

    from accumlab.engine import distributed
    from accumlab.engine.trainer import train
    from accumlab.lab.parallel_lab import lab_examples

    torch.set_num_threads(1)
    distributed.init_from_env()
    world = dist.get_world_size()
    data = lab_examples(world * micro * k * steps)
    runs, tensors = {}, {}
    for name, parallel in RUNS.items():
        model, meter = lab_model(), ShardMeter()
        train(model, data, lab_config(micro, k, steps, **parallel), callbacks=[meter])
        per_rank = [None] * world
        dist.all_gather_object(per_rank, meter.summary())
        runs[name] = per_rank
        full = fsdp.full_parameters(model)
        tensors[name] = torch.cat([p.flatten() for p in full.values()])
    if dist.get_rank() == 0:
        model = lab_model()
        blocks = fsdp.transformer_blocks(model)
        param_bytes = fsdp.local_bytes({id(p): p for p in model.parameters()}.values())
        summary = {"world": world, "micro": micro, "k": k, "steps": steps,
                   "n_params": count_parameters(model), "param_bytes": param_bytes,
                   "block_bytes": fsdp.local_bytes(p for b in blocks for p in b.parameters()),
                   "runs": runs}
        save_report(out_dir, "sharding_lab", summary, tensors)
    dist.barrier()
    dist.destroy_process_group()


def launch(out_dir: str, nproc: int = 2, micro: int = 2, k: int = 4, steps: int = 2,
           timeout: float = 600) -> dict:
    """Run the three trainings in `nproc` CPU processes under torchrun; returns rank 0's report:
    `runs[name]` is a list with one summary per rank, `params[name]` the final parameters."""
    return launch_workers("accumlab.lab.sharding_lab", "sharding_lab", out_dir, nproc,
                          ["--micro", str(micro), "--k", str(k), "--steps", str(steps)], timeout)


def memory_table(report: dict) -> list[dict]:
    """Per run and rank: bytes of weights, gradient (between micro-batches, at the step) and
    AdamW moments this rank held, with what the rules predict from the model's bytes P:
    replicated P, P, 2P; sharded P/R, P (sync skipped) or P/R, P/R, 2P/R."""
    P, R, rows = report["param_bytes"], report["world"], []
    for name, ranks in report["runs"].items():
        sharded = name != "ddp"
        between = P if name != "fsdp_sync_every" else P // R
        for rank, run in enumerate(ranks):
            last = run["windows"][-1]
            measured = {"weights": run["weights"],
                        "gradient_between": last["gradient_between_micro_batches"],
                        "gradient_at_step": last["gradient_at_step"],
                        "optimizer": run["optimizer_moments"]}
            predicted = {"weights": P // R if sharded else P,
                         "gradient_between": between if report["k"] > 1 else 0,
                         "gradient_at_step": P // R if sharded else P,
                         "optimizer": 2 * P // R if sharded else 2 * P}
            rows.append({"run": name, "rank": rank, **measured,
                         "states_at_step": measured["weights"] + measured["gradient_at_step"]
                         + measured["optimizer"],
                         "predicted": predicted, "as_predicted": measured == predicted})
    return rows


def communication_table(report: dict) -> list[dict]:
    """Per run (rank 0): collectives and their buffer bytes per window, the prediction from
    the model's bytes P (blocks B, k micro-batches), and what each rank sends in a ring."""
    P, B, k, R = report["param_bytes"], report["block_bytes"], report["k"], report["world"]
    share = (R - 1) / R  # of a buffer each rank sends in a ring reduce-scatter or all-gather
    predicted = {"ddp": {"all_reduce_bytes": P},
                 "fsdp": {"all_gather_bytes": k * (P + B), "reduce_scatter_bytes": P},
                 "fsdp_sync_every": {"all_gather_bytes": k * (P + B),
                                     "reduce_scatter_bytes": k * P}}
    rows = []
    for name, ranks in report["runs"].items():
        w = ranks[0]["windows"][-1]
        keys = ("all_reduce_bytes", "all_gather_bytes", "reduce_scatter_bytes")
        measured = {key: w.get(key, 0) for key in keys}
        guess = {key: predicted[name].get(key, 0) for key in keys}
        sent = (2 * share * measured["all_reduce_bytes"]
                + share * (measured["all_gather_bytes"] + measured["reduce_scatter_bytes"]))
        rows.append({"run": name, "all_reduces": w.get("all_reduces", 0),
                     "all_gathers": w.get("all_gathers", 0),
                     "reduce_scatters": w.get("reduce_scatters", 0), **measured,
                     "as_predicted": measured == guess, "sent_per_rank": sent,
                     "label_tokens": w["items"], "sent_per_token": sent / w["items"]})
    return rows


def state_bytes_per_rank(n_params: float, ranks: int, weight: int = 2, grad: int = 2,
                         optimizer: int = 12) -> dict[str, float]:
    """Model-state bytes per rank: replicated (DDP), ZeRO-1 (optimizer sharded), ZeRO-2 (and
    gradients), ZeRO-3 / FSDP (and weights). The defaults are ZeRO's mixed-precision Adam:
    16N, 4N + 12N/R, 2N + 14N/R, 16N/R for N parameters on R ranks."""
    n = float(n_params)
    return {"ddp": (weight + grad + optimizer) * n,
            "zero1": (weight + grad) * n + optimizer * n / ranks,
            "zero2": weight * n + (grad + optimizer) * n / ranks,
            "zero3": (weight + grad + optimizer) * n / ranks}


def trade_off(n_params: float, ranks: int, k: int) -> list[dict]:
    """Per rank and window, bf16 training with AdamW, as accumlab runs it: memory of model
    states (the peak between micro-batches) and bytes sent, for DDP and for FSDP with the
    gradient sync skipped or done every micro-batch.

    DDP (bf16 autocast): float32 weights, gradients and moments, 16N; one ring all-reduce of
    the float32 gradients, 2(R-1)/R x 4N. FSDP (bf16 compute, float32 reduction): 16N/R kept;
    every micro-batch all-gathers the bf16 weights twice (forward, and again in the backward),
    2k x (R-1)/R x 2N; the float32 gradient is reduce-scattered once, (R-1)/R x 4N, while
    between micro-batches each rank holds the whole accumulated float32 gradient, 4N, beside
    its shards of weights and moments, 12N/R (the gradient's shard exists only after the
    reduce-scatter); or k times, with no such buffer. Activations, workspace and the one
    unsharded block in flight are left out.
    """
    n, share = float(n_params), (ranks - 1) / ranks
    sharded = 16 * n / ranks
    gathers = 2 * k * share * 2 * n
    return [
        {"setup": "DDP", "memory": 16 * n, "sent": 2 * share * 4 * n},
        {"setup": "FSDP, sync skipped", "memory": 12 * n / ranks + 4 * n if k > 1 else sharded,
         "sent": gathers + share * 4 * n},
        {"setup": "FSDP, sync every micro-batch", "memory": sharded,
         "sent": gathers + k * share * 4 * n},
    ]


def main(argv: list[str] | None = None) -> None:
    """Command line of the worker (run it under torchrun)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for rank 0's results")
    p.add_argument("--micro", type=int, default=2, help="micro-batch size per rank")
    p.add_argument("--k", type=int, default=4, help="accumulation steps")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per run")
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        raise SystemExit("run this under torchrun: python -m torch.distributed.run "
                         "--standalone --nproc_per_node=2 -m accumlab.lab.sharding_lab --out DIR")
    worker(args.out, args.micro, args.k, args.steps)


if __name__ == "__main__":
    main()
