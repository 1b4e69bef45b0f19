"""Batching: dynamic padding to the longest sequence of each micro-batch."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .losses import IGNORE_INDEX


def _as_list(x) -> list:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def pad_collate(
    examples: Sequence[dict],
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Stack examples into a batch padded to its own longest sequence (never to a fixed length).

    Each example has `input_ids`, optional `attention_mask` and `labels`: a token list (language
    modelling, padded with -100) or a single int (classification). Right padding.
    """
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    ids = [_as_list(e["input_ids"]) for e in examples]
    if max_length is not None:
        ids = [s[:max_length] for s in ids]
    longest = max(len(s) for s in ids)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(ids), longest), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        given = examples[row].get("attention_mask")
        mask = _as_list(given)[: len(seq)] if given is not None else [1] * len(seq)
        attention[row, : len(seq)] = torch.tensor(mask, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention}
    if "labels" not in examples[0]:
        return batch
    first = examples[0]["labels"]
    if isinstance(first, int) or (isinstance(first, torch.Tensor) and first.dim() == 0):
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
        return batch
    labels = torch.full((len(ids), longest), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        seq = _as_list(example["labels"])[: len(ids[row])]
        labels[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    batch["labels"] = labels
    return batch


class PadCollator:
    """`pad_collate` bound to a pad id, usable as a DataLoader `collate_fn`."""

    def __init__(self, pad_token_id: int = 0, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        return pad_collate(examples, self.pad_token_id, self.pad_to_multiple_of)
