"""Epoch order and micro-batches, deterministic from (seed, epoch) so that resume is exact."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from . import distributed
from .collate import pad_collate


def epoch_order(n: int, epoch: int, *, shuffle: bool, seed: int) -> list[int]:
    """Example indices of one epoch for this rank.

    Shuffled with a generator seeded by (seed, epoch). Under torch.distributed each rank takes
    every R-th index after the tail is cut to a multiple of R, so all ranks get equal shares.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    world, rank = distributed.world_size(), distributed.rank()
    if world > 1:
        order = order[: len(order) - len(order) % world][rank::world]
    return order


def micro_batches(
    data: Sequence, order: list[int], micro_batch_size: int, *, pad_token_id: int,
    collate=None, skip: int = 0, seq_len=None,
) -> Iterator[dict]:
    """Collated micro-batches of `micro_batch_size` examples (the last may be smaller).

    `skip` drops that many micro-batches from the start (resuming in the middle of an epoch).
    `seq_len()`, if given, returns the length to truncate the next micro-batch to (None: keep
    it whole); it is called as each micro-batch is made, for sequence-length warmup.
    """
    collate = collate or (lambda examples: pad_collate(examples, pad_token_id))
    for start in range(skip * micro_batch_size, len(order), micro_batch_size):
        batch = collate([data[i] for i in order[start:start + micro_batch_size]])
        length = seq_len() if seq_len else None
        yield truncate(batch, length) if length else batch


def truncate(batch: dict, length: int) -> dict:
    """Keep the first `length` positions of every per-position tensor of a collated batch."""
    width = batch["input_ids"].shape[1]
    if length >= width:
        return batch
    return {k: v[:, :length] if v.dim() >= 2 and v.shape[1] == width else v
            for k, v in batch.items()}


def windows_per_epoch(n_examples: int, micro_batch_size: int, accum_steps: int,
                      partial_window: str) -> int:
    """Windows in one epoch of this rank's `n_examples` examples."""
    n_micro = -(-n_examples // micro_batch_size)
    full, rest = divmod(n_micro, accum_steps)
    return full + (1 if rest and partial_window == "step" else 0)
