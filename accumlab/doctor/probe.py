"""The probe: a tiny float64 GPT-2, fixed micro-batches, and their exact window updates."""

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


CLIP_FRACTION = 0.3  # the clipping probe sets max_grad_norm to this fraction of the exact norm


def make_probe_model(seed: int = 0) -> torch.nn.Module:
    """The tiny float64 GPT-2 the probes run on (1 layer, width 32, vocabulary 64)."""
    from accumlab.engine.models import make_model

    model = make_model("gpt2", "tiny", seed=seed, dtype=torch.float64, vocab_size=VOCAB,
                       max_positions=64, n_layer=1, n_embd=32, n_head=2)
    model.eval()  # dropout is 0 anyway; eval() also makes the model deterministic
    return model


def _sequences(lengths: list[int], gen: torch.Generator) -> list[dict]:
    out = []
    for n in lengths:
        ids = torch.randint(2, VOCAB, (n,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def probe_windows(k: int, seed: int = 0) -> dict[str, list[dict]]:
    """Fixed micro-batches: `equal` (same token count each), `unequal`, `partial`, `second`."""
    gen = torch.Generator().manual_seed(seed)
    pattern = [(24, 20), (4,), (12, 3), (6, 5, 3)]  # label tokens per micro-batch: 42, 3, 13, 11
    return {
        "equal": [pad_collate(_sequences([9, 9], gen)) for _ in range(k)],
        "unequal": [pad_collate(_sequences(list(pattern[j % 4]), gen)) for j in range(k)],
        "partial": [pad_collate(_sequences([9, 9], gen)) for _ in range(max(1, k // 2))],
        "second": [pad_collate(_sequences([9, 9], gen)) for _ in range(k)],
    }


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
