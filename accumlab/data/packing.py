"""Packing whole documents into rows without cross-contamination, and token-budget batching.

`pack_documents` puts whole tokenised documents side by side in rows of at most `block_size`
tokens. Each row carries `position_ids` that restart at 0 for every document, and the label of
each document's first token is -100, so no token is ever predicted from another document.
`accumlab.engine.collate.packed_collate` stacks rows and builds a block-diagonal causal
attention mask, so a token attends only to earlier tokens of its own document. Packed and unpacked training then give the
same per-document losses (Krell et al. 2021, arXiv:2107.02027).

What GPT-2 in transformers 5.24 accepts (CPU, measured in tests/test_packing.py):

- a 4-D additive float mask (0 = attend, dtype minimum = blocked) with per-document
  `position_ids`: exact with "sdpa" and "eager". Its dtype must match the query dtype under
  sdpa (float32 for fp32 and bf16 autocast, float64 for a float64 model);
- a 4-D bool mask (True = attend): exact with "sdpa" in any dtype, **wrong** with "eager",
  which adds the mask to the scores as 0/1;
- `position_ids` alone (no attention_mask): transformers derives the documents from the
  restarts, but only when no cache is built, i.e. `use_cache=False` (GPT-2's config has
  use_cache=True, even in train mode); with a 2-D all-ones mask it never does (the restart
  detection runs only when attention_mask is None). Both failures are silent: tokens attend
  across documents.

`accumlab.engine.batching.token_budget_batches` groups examples into micro-batches whose
padded size (rows × longest) stays within a token budget (Vaswani et al. 2017; Ott et al.
2018); `padding_waste` measures padding, token-budget batching and packing on the same
documents, and `pack_examples` is the naive packing (concatenate and cut) for comparison.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from accumlab.engine.batching import token_budget_batches
from accumlab.engine.collate import _as_list, _segment_ids
from accumlab.engine.losses import IGNORE_INDEX, per_item_losses

PACKING_STRATEGIES = ("first_fit", "in_order")


def _document_chunks(examples: Sequence[dict], block_size: int) -> list[tuple[list, list]]:
    """(input_ids, labels) of each document, long ones cut into pieces of block_size."""
    chunks = []
    for e in examples:
        ids = _as_list(e["input_ids"])
        labels = _as_list(e.get("labels", ids))
        if len(labels) != len(ids):
            raise ValueError("pack_documents needs token labels as long as input_ids "
                             f"(got {len(labels)} labels for {len(ids)} tokens)")
        for i in range(0, len(ids), block_size):
            if ids[i:i + block_size]:
                chunks.append((ids[i:i + block_size], labels[i:i + block_size]))
    return chunks


def _assign_rows(lengths: Sequence[int], block_size: int, strategy: str) -> list[list[int]]:
    """Indices of the documents in each row: first-fit decreasing, or in the given order."""
    rows: list[list[int]] = []
    room: list[int] = []
    if strategy == "in_order":
        for i, n in enumerate(lengths):
            if not rows or room[-1] < n:
                rows.append([])
                room.append(block_size)
            rows[-1].append(i)
            room[-1] -= n
        return rows
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        n = lengths[i]
        target = next((r for r, free in enumerate(room) if free >= n), None)
        if target is None:
            rows.append([])
            room.append(block_size)
            target = len(rows) - 1
        rows[target].append(i)
        room[target] -= n
    return rows


def pack_documents(examples: Sequence[dict], block_size: int, *,
                   strategy: str = "first_fit") -> list[dict]:
    """Pack whole documents into rows of at most `block_size` tokens.

    Each example is a document `{"input_ids", optional "labels"}` (labels default to the
    inputs; -100 entries are kept). A document longer than `block_size` is first cut into
    pieces of `block_size` tokens, each then treated as its own document. `strategy`
    "first_fit" (first-fit decreasing: fewest rows, least padding) or "in_order" (keeps the
    order; a new row starts when the next document does not fit).

    Returns rows `{"input_ids", "labels", "position_ids", "document_ids"}` (lists, unpadded):
    positions restart at 0 and the label of every document's first token is -100, so the
    causal-LM loss never predicts a token from another document. `document_ids` gives each
    token's document (its index among the pieces, in input order; with no document longer than
    `block_size` that is the example's index). Collate with `packed_collate`, which leaves
    `document_ids` out of the batch.
    """
    if not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    if strategy not in PACKING_STRATEGIES:
        raise ValueError(f"strategy must be one of {PACKING_STRATEGIES}, got {strategy!r}")
    chunks = _document_chunks(examples, block_size)
    rows = []
    for members in _assign_rows([len(c[0]) for c in chunks], block_size, strategy):
        row = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
        for index in members:
            ids, labels = chunks[index]
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + labels[1:]
            row["position_ids"] += list(range(len(ids)))
            row["document_ids"] += [index] * len(ids)
        rows.append(row)
    return rows


def packed_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a packed batch (input_ids, position_ids and mask on the model's device).

    Use as `forward=` of `accumlab.engine.window.accumulate_gradients`. A float mask is cast to the
    model's dtype; without a mask the model is called with use_cache=False so that
    transformers can find the documents from the position restarts.
    """
    param = next(model.parameters())
    inputs = {"input_ids": batch["input_ids"].to(param.device),
              "position_ids": batch["position_ids"].to(param.device)}
    mask = batch.get("attention_mask")
    if mask is None:
        inputs["use_cache"] = False
    else:
        inputs["attention_mask"] = mask.to(param.device, param.dtype if mask.is_floating_point()
                                           else mask.dtype)
    return model(**inputs).logits


def per_document_losses(logits: torch.Tensor, batch: dict) -> list[list[tuple[float, int]]]:
    """(summed causal-LM loss, label tokens) of every segment of every packed row, in order.

    Segments are found from `position_ids` (they restart at 0): the row's documents in the
    order of its `document_ids`, then the padding (if any), whose count is 0.
    """
    losses = per_item_losses(logits, batch["labels"], "causal_lm").detach()  # (rows, s - 1)
    valid = batch["labels"][:, 1:].to(losses.device) != IGNORE_INDEX
    segments = _segment_ids(batch["position_ids"]).to(losses.device)
    predicted = segments[:, 1:]  # the segment of each predicted token
    out = []
    for r in range(losses.shape[0]):
        row = []
        for d in range(int(segments[r].max()) + 1):
            where = (predicted[r] == d) & valid[r]
            row.append((float(losses[r][where].sum()), int(where.sum())))
        out.append(row)
    return out


def padded_size(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Token slots of one padded micro-batch: rows × its longest sequence."""
    return len(batch) * max(lengths[i] for i in batch)


def padding_waste(lengths: Sequence[int], *, micro_batch_size: int, max_tokens: int,
                  block_size: int, seed: int = 0) -> dict[str, dict]:
    """Real tokens, token slots and padding fraction of three ways to batch the same documents.

    "padded": consecutive micro-batches of `micro_batch_size` in a random order, each padded
    to its longest (`padding_stats`); "token budget": `token_budget_batches` of
    `max_tokens`; "packed": `pack_documents` rows of `block_size` (first-fit), each padded to
    `block_size`. Documents longer than `block_size` are cut for all three, so all schemes
    see the same tokens.
    """
    pieces = []
    for n in lengths:  # the pieces pack_documents would make
        pieces += [block_size] * (n // block_size) + ([n % block_size] if n % block_size else [])
    shuffled = pieces[:]
    random.Random(seed).shuffle(shuffled)
    real = sum(pieces)
    padded = padding_stats(shuffled, micro_batch_size)
    budget = token_budget_batches(pieces, max_tokens, seed=seed)
    budget_slots = sum(padded_size(pieces, b) for b in budget)
    rows = _assign_rows(pieces, block_size, "first_fit")
    packed_slots = len(rows) * block_size

    def entry(slots: int) -> dict:
        return {"real_tokens": real, "token_slots": slots,
                "padding_fraction": 1 - real / slots if slots else 0.0}

    return {"padded": entry(padded["padded_tokens"]), "token budget": entry(budget_slots),
            "packed": entry(packed_slots)}


def padding_stats(lengths: Sequence[int], micro_batch_size: int) -> dict:
    """Real and padded tokens when consecutive sequences are padded per micro-batch."""
    if micro_batch_size < 1:
        raise ValueError("micro_batch_size must be >= 1")
    real = sum(lengths)
    padded = 0
    for start in range(0, len(lengths), micro_batch_size):
        chunk = lengths[start:start + micro_batch_size]
        padded += max(chunk) * len(chunk)
    return {"real_tokens": real, "padded_tokens": padded,
            "padding_fraction": 1 - real / padded if padded else 0.0}


def pack_examples(examples: Sequence[dict], block_size: int, eos_token_id: int | None = None
                  ) -> list[dict]:
    """Concatenate examples into blocks of exactly `block_size` tokens (the remainder dropped).

    Labels follow the inputs; the first label of each original document after a boundary is
    kept (a packed model attends across documents unless the attention is masked per document).
    """
    ids: list[int] = []
    labels: list[int] = []
    for e in examples:
        ids += list(e["input_ids"])
        labels += list(e.get("labels", e["input_ids"]))
        if eos_token_id is not None and ids[-1] != eos_token_id:
            ids.append(eos_token_id)
            labels.append(eos_token_id)
    return [{"input_ids": ids[i:i + block_size], "labels": labels[i:i + block_size]}
            for i in range(0, len(ids) - block_size + 1, block_size)]



__all__ = ["PACKING_STRATEGIES", "pack_documents", "pack_examples", "packed_forward",
           "padded_size", "padding_stats", "padding_waste", "per_document_losses"]
