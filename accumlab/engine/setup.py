"""What `train` prepares before its loop: checked data, the model wrapped for DDP or
compile, the optimizer, the collate function and device copies."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accumlab.engine import distributed
from accumlab.engine.collate import pad_collate
from accumlab.engine.config import TrainConfig
from accumlab.engine.precision import Precision


def pad_token_id(model: torch.nn.Module, cfg: TrainConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if pad is not None else 0


def wrap_for_training(model: torch.nn.Module, device: torch.device, cfg: TrainConfig):
    net = model
    if cfg.parallel == "fsdp":  # sharded in place: `model` is the wrapped module
        from accumlab.engine.fsdp import shard_model

        return shard_model(model, device, cfg)
    if distributed.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index or torch.cuda.current_device()] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile and distributed.is_distributed():
        net = torch.compile(net)  # one process: accumlab.engine.compiled compiles the micro-step
    return net


def default_collate(data: Sequence, pad_id: int, precision: Precision):
    if "position_ids" not in data[0]:
        return lambda examples: pad_collate(examples, pad_id)
    from accumlab.engine.collate import packed_collate

    # sdpa needs the additive mask in the dtype of the queries' parameters (fp32 or fp64)
    return lambda rows: packed_collate(rows, pad_id, mask_dtype=precision.param_dtype)


def real_tokens(batch: dict, pad_id: int) -> int:
    """Tokens that are not padding (packed rows carry a 4-D mask: count non-pad ids)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int((batch["input_ids"] != pad_id).sum())


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    new = getattr(model, "activation_checkpointing_enable", None)
    old = getattr(model, "gradient_checkpointing_enable", None)
    if (new or old) is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(): turn "
                         "TrainConfig.gradient_checkpointing off or wrap its blocks in "
                         "torch.utils.checkpoint yourself")
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and clashes with it
    if new is not None:
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        old(gradient_checkpointing_kwargs={"use_reentrant": False})


def to_device(batch: dict, device: torch.device, labels: bool = False) -> dict:
    """The model inputs (and `labels`, if asked) of a micro-batch on `device`; on CUDA copied
    from pinned memory without blocking, so that a window's copies overlap the compute already
    queued."""
    inputs = {k: v for k, v in batch.items() if labels or k != "labels"}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in inputs.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, lr: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    fused = device.type == "cuda" and cfg.parallel != "fsdp"  # foreach for sharded DTensors
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=fused or None)


def mean_length(data: Sequence, sample: int = 256) -> float:
    n = min(len(data), sample)
    return sum(len(data[i]["input_ids"]) for i in range(n)) / n
