"""Packing whole documents into rows without cross-contamination, and token-budget batching.

`pack_documents` puts whole tokenised documents side by side in rows of at most `block_size`
tokens. Each row carries `position_ids` that restart at 0 for every document, and the label of
each document's first token is -100, so no token is ever predicted from another document.
`packed_collate` stacks rows and builds a block-diagonal causal attention mask, so a token
attends only to earlier tokens of its own document. Packed and unpacked training then give the
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

`token_budget_batches` groups examples into micro-batches whose padded size (rows × longest)
stays within a token budget (Vaswani et al. 2017; Ott et al. 2018), and `padding_waste`
measures padding, token-budget batching and packing on the same documents.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from .collate import _as_list
from .lengths import padding_stats
from .losses import IGNORE_INDEX, per_item_losses

ATTENTION_MODES = ("float", "bool", "position_ids")
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


def packed_forward(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Logits of a packed batch (input_ids, position_ids and mask on the model's device).

    Use as `forward=` of `accumlab.window.accumulate_gradients`. A float mask is cast to the
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


def padded_size(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Token slots of one padded micro-batch: rows × its longest sequence."""
    return len(batch) * max(lengths[i] for i in batch)


def padding_waste(lengths: Sequence[int], *, micro_batch_size: int, max_tokens: int,
                  block_size: int, seed: int = 0) -> dict[str, dict]:
    """Real tokens, token slots and padding fraction of three ways to batch the same documents.

    "padded": consecutive micro-batches of `micro_batch_size` in a random order, each padded
    to its longest (`lengths.padding_stats`); "token budget": `token_budget_batches` of
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


__all__ = ["ATTENTION_MODES", "PACKING_STRATEGIES", "block_causal_mask", "pack_documents",
           "packed_collate", "packed_forward", "padded_size", "padding_waste",
           "per_document_losses", "token_budget_batches"]
