"""Run under torchrun (2 processes, gloo) by test_integrations.py: the adapters under DDP.

Each rank trains float64 tiny models on 20 padded variable-length examples, micro-batch 2 x 2
accumulation steps: the loaders shard micro-batches across ranks (rank r gets batches r, r+2,
...), so each rank holds 5 micro-batches, windows of 2, 2 and 1, and the global windows are
micro-batches 0-3, 4-7 and 8-9: the same as one process with micro 2 x 4. Saves every
run's parameter snapshots (one per optimizer step) to OUT/integrations-RANK.pt.
"""

import os
import sys
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from accumlab.engine.models import make_model  # noqa: E402
from accumlab.integrations import AccelerateWindows, ExactTrainer  # noqa: E402
from accumlab.lab import semantics  # noqa: E402

N, MICRO, ACCUM = 20, 2, 2


def gpt2():
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    model.loss_type = None  # stock: the plain Trainer would count before the shift
    return model


def bert():
    return make_model("bert", "tiny", num_labels=3, seed=0, dtype=torch.float64)


def main(out: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    lm = semantics.padded_lm_examples(N)
    cls = semantics.classification_examples(N)
    kw = {"micro": MICRO, "accum": ACCUM}
    runs = {
        "accelerate_windows": lambda: semantics.accelerate_steps(
            gpt2(), lm, lr=0.5, recipe="windows", windows=AccelerateWindows, **kw),
        "accelerate_windows_sync_each_batch": lambda: semantics.accelerate_steps(
            gpt2(), lm, lr=0.5, recipe="windows", windows=AccelerateWindows,
            sync_each_batch=True, **kw),
        "trainer_exact_gpt2": lambda: semantics.trainer_steps(
            gpt2(), lm, lr=0.5, trainer_cls=ExactTrainer, **kw)[0],
        "trainer_exact_bert": lambda: semantics.trainer_steps(
            bert(), cls, lr=0.05, trainer_cls=ExactTrainer, **kw)[0],
        "trainer_bert": lambda: semantics.trainer_steps(bert(), cls, lr=0.05, **kw)[0],
    }
    result = {name: run() for name, run in runs.items()}
    result["world"] = dist.get_world_size()
    torch.save(result, os.path.join(out, f"integrations-{dist.get_rank()}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
