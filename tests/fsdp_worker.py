"""Run under torchrun (2 ranks, gloo) by test_fsdp.py: accumlab.train with parallel="fsdp".

    fsdp_worker.py OUT main     GPT-2 with sync skipped, with sync every micro-batch and in
                                bf16; BERT; an uninterrupted run with sharded checkpoints
    fsdp_worker.py OUT killed   the same checkpointed run, killed hard after step 3
    fsdp_worker.py OUT resume   resumes the killed run from its latest sharded checkpoint

Rank 0 writes OUT/<mode>.json and OUT/<mode>.pt (final whole parameters by run name).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from helpers import random_cls_data, random_lm_data

import accumlab
from accumlab.engine import fsdp
from accumlab.engine.models import make_model


class Meter:
    """Counts FSDP's reduce-scatters per optimizer step and reads this rank's state bytes."""

    def on_train_begin(self, info):
        self.counts = fsdp.count_collectives(info["model"])
        self.optimizer, self.model = info["optimizer"], info["model"]
        self.per_step = []

    def on_step_end(self, entry):
        keys = ("reduce_scatters", "all_gathers", "reduce_scatter_bytes", "all_gather_bytes")
        self.per_step.append({k: self.counts[k] for k in keys})
        self.counts.update({k: 0 for k in keys})

    def on_train_end(self, result):
        self.optimizer_bytes = fsdp.optimizer_state_bytes(self.optimizer)
        self.param_bytes = fsdp.weight_bytes(self.model)


def equality_config(**kw) -> accumlab.TrainConfig:
    settings = dict(micro_batch_size=2, accum_steps=2, max_steps=3, lr=1e-2, precision="fp64",
                    shuffle=False, progress=False, parallel="fsdp")
    return accumlab.TrainConfig(**{**settings, **kw})


def resume_config(out: str, **kw) -> accumlab.TrainConfig:
    return accumlab.TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=4, lr=1e-2,
                                precision="fp64", progress=False, parallel="fsdp",
                                schedule="cosine", warmup_steps=2, clip_grad_norm=1.0,
                                weight_decay=0.1, checkpoint_every=2, checkpoint_dir=out,
                                eval_every=2, **kw)  # evaluated on every rank; best is linked


def resume_model():
    return make_model("gpt2", "tiny", seed=0, dtype=torch.float64, dropout=0.1)


def run(name, model, data, cfg, runs, params, eval_data=None, **extra):
    meter = Meter()
    result = accumlab.train(model, data, cfg, eval_data=eval_data, callbacks=[meter])
    params[name] = torch.cat([p.flatten() for p in fsdp.full_parameters(model).values()])
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, [meter.optimizer_bytes, meter.param_bytes])
    runs[name] = {"losses": result.losses, "steps": meter.per_step, "groups":
                  meter.counts["groups"], "optimizer_bytes": [b[0] for b in per_rank],
                  "param_bytes": [b[1] for b in per_rank], **extra}
    return result


def main(out: str, mode: str) -> None:
    runs, params = {}, {}
    lm, cls = random_lm_data(48, seed=40), random_cls_data(48, seed=41)
    held_out = random_lm_data(6, seed=42)
    if mode == "main":
        gpt2 = lambda: make_model("gpt2", "tiny", seed=0, dtype=torch.float64)  # noqa: E731
        model = gpt2()
        run("gpt2", model, lm, equality_config(clip_grad_norm=1.0), runs, params)
        fsdp.save_pretrained(model, f"{out}/gpt2_pretrained")  # gathered, written by rank 0
        run("gpt2_sync_every", gpt2(), lm, equality_config(clip_grad_norm=1.0,
                                                           sync_every_micro_batch=True),
            runs, params)
        run("gpt2_bf16", make_model("gpt2", "tiny", seed=0), lm,
            equality_config(precision="bf16"), runs, params)
        bert = make_model("bert", "tiny", seed=0, dtype=torch.float64, num_labels=3)
        run("bert", bert, cls, equality_config(), runs, params)
        result = run("uninterrupted", resume_model(), lm, resume_config(f"{out}/uninterrupted"),
                     runs, params, eval_data=held_out)
        runs["uninterrupted"].update(evals=result.evals, best_step=result.best_step)
    elif mode == "killed":
        def kill(entry):
            if entry["step"] == 3:  # after the checkpoint of step 2, before that of step 4
                os._exit(9)
        accumlab.train(resume_model(), lm, resume_config(f"{out}/killed"), eval_data=held_out,
                       callbacks=[kill])
    elif mode == "resume":
        result = run("resumed", resume_model(), lm,
                     resume_config(f"{out}/killed", resume_from="latest"), runs, params,
                     eval_data=held_out)
        runs["resumed"].update(evals=result.evals, best_step=result.best_step)
        runs["resumed"]["history_steps"] = [e["step"] for e in result.history]
    if dist.get_rank() == 0:
        torch.save(params, f"{out}/{mode}.pt")
        world = dist.get_world_size()
        with open(f"{out}/{mode}.json", "w") as f:
            json.dump({"world": world, "runs": runs}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
