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
    collate=None, skip: int = 0, seq_len=None, groups: list[list[int]] | None = None,
) -> Iterator[dict]:
    """Collated micro-batches of `micro_batch_size` examples (the last may be smaller).

    `groups` (from `micro_batch_groups`) overrides the fixed-size split of `order`. `skip`
    drops that many micro-batches from the start (resuming in the middle of an epoch).
    `seq_len()`, if given, returns the length to truncate the next micro-batch to (None: keep
    it whole); it is called as each micro-batch is made, for sequence-length warmup.
    """
    collate = collate or (lambda examples: pad_collate(examples, pad_token_id))
    if groups is None:
        groups = micro_batch_groups(data, order, micro_batch_size)
    for group in groups[skip:]:
        batch = collate([data[i] for i in group])
        length = seq_len() if seq_len else None
        yield truncate(batch, length) if length else batch


def truncate(batch: dict, length: int) -> dict:
    """Keep the first `length` positions of every per-position tensor of a collated batch."""
    width = batch["input_ids"].shape[1]
    if length >= width:
        return batch
    out = {}
    for k, v in batch.items():
        if v.dim() == 4:  # a (rows, 1, s, s) attention mask of packed rows
            out[k] = v[:, :, :length, :length]
        elif v.dim() >= 2 and v.shape[1] == width:
            out[k] = v[:, :length]
        else:
            out[k] = v
    return out


def micro_batch_groups(data: Sequence, order: list[int], micro_batch_size: int, *,
                       max_tokens: int | None = None, shuffle: bool = True,
                       seed: int = 0) -> list[list[int]]:
    """Example indices of each micro-batch of one epoch, in training order.

    Fixed size: consecutive runs of `micro_batch_size` indices of `order`. With `max_tokens`
    (token-budget batching, `packing.token_budget_batches`): examples of similar length
    together, at most `micro_batch_size` rows and `max_tokens` padded tokens each, the groups
    shuffled (seeded) so that training sees no length curriculum.
    """
    if max_tokens is None:
        return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    from .packing import token_budget_batches

    lengths = [len(data[i]["input_ids"]) for i in order]
    groups = token_budget_batches(lengths, max_tokens, max_rows=micro_batch_size,
                                  shuffle=shuffle, seed=seed)
    return [[order[j] for j in group] for group in groups]


def windows_per_epoch(n_examples: int, micro_batch_size: int, accum_steps: int,
                      partial_window: str) -> int:
    """Windows in one epoch of this rank's `n_examples` examples."""
    n_micro = -(-n_examples // micro_batch_size)
    full, rest = divmod(n_micro, accum_steps)
    return full + (1 if rest and partial_window == "step" else 0)
