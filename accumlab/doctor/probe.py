"""The probe: a stock tiny GPT-2 (float64, or float32 on request), fixed micro-batches, and
their exact window updates."""

from __future__ import annotations

import copy
import warnings

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.gradients import gradient_vector
from accumlab.engine.losses import count_items, summed_loss
from accumlab.engine.window import accumulate_gradients

TASK = "causal_lm"


VOCAB = 64


LR = 1.0


SCALER_SCALE = 1024.0


CLIP_FRACTION = 0.3  # the clipping probe sets max_grad_norm to this fraction of the update's norm


def load_modules() -> None:
    """Import what the probe model needs (seconds, once per process): done before a check forks,
    so that its child does not pay for it again."""
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401


def make_probe_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """The tiny GPT-2 the probes run on (1 layer, width 32, vocabulary 64), as users have it.

    A stock `GPT2LMHeadModel`: its `loss_type` stays None, as in a model built from a config or
    loaded from a checkpoint (`accumlab.engine.models.make_model` sets "ForCausalLM", which
    changes how the Hugging Face Trainer counts label tokens). Same weights as make_model's.
    """
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from accumlab.engine.models import gpt2_config

    torch.manual_seed(seed)
    config = gpt2_config("tiny", vocab_size=VOCAB, max_positions=64, n_layer=1, n_embd=32,
                         n_head=2)
    model = GPT2LMHeadModel._from_config(config, dtype=dtype)
    model.eval()  # dropout is 0 anyway; eval() also makes the model deterministic
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:  # transformers warns once that loss_type=None means the default loss: use up that warning
        model.loss_function  # noqa: B018
    finally:
        hf_logging.set_verbosity(level)
    return model


def _sequences(lengths: list[int], gen: torch.Generator) -> list[dict]:
    out = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


UNEQUAL = [(24, 20), (4,), (12, 3), (6, 5, 3)]  # label tokens per micro-batch: 42, 3, 13, 11


def probe_windows(k: int, seed: int = 0) -> dict[str, list[dict]]:
    """Fixed micro-batches: `equal` (same token count each), `unequal`, `second` (the next
    window), and the partial last windows of an epoch: `partial` (k-1 micro-batches),
    `partial_1` (one) and `partial_unequal` (k//2, unequal token counts), where k allows them."""
    gen = torch.Generator().manual_seed(seed)

    def window(lengths_per_micro_batch):
        return [pad_collate(_sequences(list(lengths), gen)) for lengths in lengths_per_micro_batch]

    windows = {
        "equal": window([(9, 9)] * k),
        "unequal": window([UNEQUAL[j % 4] for j in range(k)]),
        "partial": window([(9, 9)] * (k - 1)),
        "second": window([(9, 9)] * k),
    }
    if k > 2:
        windows["partial_1"] = window([(9, 9)])
        windows["partial_unequal"] = window(UNEQUAL[:max(2, k // 2)])
    return windows


def num_items(batch: dict) -> int:
    """Label tokens of a causal-LM micro-batch after the shift (what the exact loss counts)."""
    return count_items(batch["labels"], TASK)


def loss_fn(model: torch.nn.Module, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The micro-batch's mean token loss (`reduction="mean"`) or summed token loss ("sum")."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total = summed_loss(logits, batch["labels"], TASK)
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(num_items(batch), 1)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def exact_update(model: torch.nn.Module, batches: list[dict], normalization: str = "tokens"):
    """The exact window gradient at `model`'s parameters (float64 vector) and the window loss."""
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mean_of_means warns about unequal counts: we know
        loss = accumulate_gradients(net, batches, task=TASK, normalization=normalization)
    return gradient_vector(net), loss


def param_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def probe_reference(accum_steps: int = 4, seed: int = 0) -> dict:
    """The fixed probe data with its exact window gradients (for notebooks and tests)."""
    model = make_probe_model(seed)
    data = probe_windows(accum_steps, seed)
    return {name: {"micro_batches": batches, "items": [num_items(b) for b in batches],
                   "exact_gradient": exact_update(model, batches)[0]}
            for name, batches in data.items()} | {"model": model}
