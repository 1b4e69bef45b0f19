"""Epoch order and micro-batches, deterministic from (seed, epoch) so that resume is exact."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from accumlab.engine import distributed
from accumlab.engine.collate import pad_collate


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
    (token-budget batching, `token_budget_batches`): examples of similar length
    together, at most `micro_batch_size` rows and `max_tokens` padded tokens each, the groups
    shuffled (seeded) so that training sees no length curriculum.
    """
    if max_tokens is None:
        return [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    from accumlab.engine.batching import token_budget_batches

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


def token_budget_batches(lengths: Sequence[int], max_tokens: int, *,
                         sort_by_length: bool = True, max_rows: int | None = None,
                         shuffle: bool = True, seed: int = 0) -> list[list[int]]:
    """Group example indices into micro-batches whose padded size rows × longest ≤ max_tokens.

    With `sort_by_length` neighbours have similar lengths (little padding); `shuffle` then
    shuffles the order of the micro-batches (not their content), so training does not see
    a length curriculum. `max_rows` caps the sequences per micro-batch. Every index appears
    in exactly one micro-batch. Micro-batches hold different numbers of tokens, so normalise
    the loss by the window's token count (accumlab's default), never per micro-batch.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    too_long = [n for n in lengths if n > max_tokens]
    if too_long:
        raise ValueError(f"{len(too_long)} example(s) are longer than max_tokens={max_tokens} "
                         f"(longest {max(too_long)}): raise max_tokens or truncate them")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort_by_length \
        else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        wider = max(longest, lengths[i])
        full = max_rows is not None and len(current) >= max_rows
        if current and (full or (len(current) + 1) * wider > max_tokens):
            batches.append(current)
            current, wider = [], lengths[i]
        current.append(i)
        longest = wider
    if current:
        batches.append(current)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches
