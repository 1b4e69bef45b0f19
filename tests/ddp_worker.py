"""Run under torchrun by test_distributed.py: train with DDP and count gradient all-reduces."""

import json
import sys

import torch
import torch.distributed as dist
from helpers import random_lm_data
from safetensors.torch import save_model

import accumlab
from accumlab.engine.models import make_model


class CountAllReduces:
    """A DDP comm hook that counts bucket all-reduces per optimizer step."""

    def __init__(self):
        self.calls, self.per_step = 0, []

    def on_train_begin(self, info):
        world = dist.get_world_size()

        def hook(state, bucket):
            self.calls += 1
            fut = dist.all_reduce(bucket.buffer().div_(world), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        info["model"].register_comm_hook(None, hook)

    def on_step_end(self, record):
        self.per_step.append(self.calls)
        self.calls = 0


def main(out_dir: str, accum_steps: int, use_no_sync: str) -> None:
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    cfg = accumlab.TrainConfig(micro_batch_size=2, accum_steps=accum_steps, max_steps=3,
                               lr=1e-2, precision="fp64", shuffle=False, progress=False)
    counter = CountAllReduces()
    if use_no_sync == "off":  # the bug: every micro-batch all-reduces
        import accumlab.engine.window as window_mod

        window_mod.Window.__iter__ = _iter_without_no_sync
    result = accumlab.train(model, random_lm_data(48, seed=40), cfg, callbacks=[counter])
    if dist.get_rank() == 0:
        save_model(model, f"{out_dir}/ddp.safetensors")
        json.dump({"per_step": counter.per_step, "losses": result.losses,
                   "world": dist.get_world_size()}, open(f"{out_dir}/ddp.json", "w"))
    dist.destroy_process_group()


def _iter_without_no_sync(self):
    for i, batch in enumerate(self.micro_batches):
        self._index = i
        yield batch


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
