"""Collation: dynamic padding to the longest sequence of each micro-batch, and packed rows.

`packed_collate` stacks rows made by `accumlab.data.packing.pack_documents` with a
block-diagonal causal mask, so a token attends only to earlier tokens of its own document.
What GPT-2 in transformers 5.24 accepts is listed in that module's docstring.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accumlab.engine.losses import IGNORE_INDEX


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


ATTENTION_MODES = ("float", "bool", "position_ids")


def _segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Document index of every position: a new document starts where the position is 0."""
    return (position_ids == 0).long().cumsum(dim=-1) - 1


def block_causal_mask(position_ids: torch.Tensor, mode: str = "float",
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """4-D (rows, 1, s, s) mask letting each token attend to earlier tokens of its document.

    Documents are read from `position_ids` (they restart at 0). `mode` "float" gives an
    additive mask (0 or the dtype's minimum, of `dtype`), "bool" gives True where allowed.
    """
    seg = _segment_ids(position_ids)
    s = position_ids.shape[-1]
    causal = torch.ones(s, s, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    allowed = allowed[:, None]
    if mode == "bool":
        return allowed
    if mode != "float":
        raise ValueError(f"mask mode must be 'float' or 'bool', got {mode!r}")
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def packed_collate(rows: Sequence[dict], pad_token_id: int = 0, *, attention: str = "float",
                   mask_dtype: torch.dtype = torch.float32,
                   pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Stack packed rows into a batch: input_ids, labels, position_ids and the attention mask.

    Rows are right-padded to the longest row (or `pad_to`); the padding is its own segment
    (positions from 0, labels -100), so it neither attends to nor is attended by a document.
    `attention`: "float" (4-D additive mask of `mask_dtype`; eager and sdpa), "bool" (4-D,
    sdpa only) or "position_ids" (no mask: the model must derive documents from the position
    restarts, which GPT-2 in transformers 5.24 does only with use_cache=False).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    longest = max(len(r["input_ids"]) for r in rows)
    width = max(longest, pad_to or 0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        if "position_ids" not in row:
            raise ValueError("packed_collate needs rows from pack_documents (no position_ids)")
        ids[i, :n] = torch.tensor(_as_list(row["input_ids"]), dtype=torch.long)
        labels[i, :n] = torch.tensor(_as_list(row["labels"]), dtype=torch.long)
        positions[i, :n] = torch.tensor(_as_list(row["position_ids"]), dtype=torch.long)
        positions[i, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if attention != "position_ids":
        batch["attention_mask"] = block_causal_mask(positions, attention, mask_dtype)
    return batch
