"""Masked-language-model examples: BERT's 80/10/10 masking, deterministic per example and epoch.

The shipped tokenizer has no mask token, so masked-LM models use one extra id: `MASK_ID` = 4096
(the vocabulary size), and a model vocabulary of 4097. `add_mask_token(tokenizer)` adds the
matching `[MASK]` special token to a tokenizer, so a saved checkpoint and its tokenizer agree.

`MaskedLMDataset` is a map-style dataset for `accumlab.train`: item i is example i with about 15%
of its tokens selected; of those, 80% become `[MASK]`, 10% a random token and 10% stay as they
are; `labels` holds the original token at selected positions and -100 elsewhere (masked-LM
labels are not shifted). The choice is seeded by (seed, epoch, index), so a run is reproducible
and `set_epoch` gives fresh masks each epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from accumlab.engine.losses import IGNORE_INDEX

MASK_TOKEN = "[MASK]"
MASK_ID = 4096  # the first id after the shipped tokenizer's vocabulary of 4096


def add_mask_token(tokenizer):
    """Add `[MASK]` as the tokenizer's mask token (id 4096 for the shipped tokenizer)."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    return tokenizer


def mask_tokens(
    input_ids: Sequence[int], *, mask_id: int = MASK_ID, vocab_size: int = MASK_ID,
    probability: float = 0.15, special_ids: Sequence[int] = (0, 1),
    generator: torch.Generator | None = None,
) -> tuple[list[int], list[int]]:
    """BERT masking of one sequence: returns (masked input_ids, labels).

    Each non-special token is selected with `probability` (at least one token is selected when
    the sequence has any); selected tokens become `mask_id` (80%), a random id below
    `vocab_size` (10%) or stay (10%). Labels are the original ids at selected positions, -100
    elsewhere.
    """
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"probability must be in (0, 1], got {probability}")
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)
    maskable = ~torch.isin(ids, torch.as_tensor(list(special_ids), dtype=torch.long))
    selected = (torch.rand(ids.shape, generator=generator) < probability) & maskable
    if not bool(selected.any()) and bool(maskable.any()):
        candidates = maskable.nonzero().flatten()
        pick = torch.randint(len(candidates), (1,), generator=generator)
        selected[candidates[pick]] = True
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE_INDEX))
    roll = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    out = ids.clone()
    out[selected & (roll < 0.8)] = mask_id
    swap = selected & (roll >= 0.8) & (roll < 0.9)
    out[swap] = random_ids[swap]
    return out.tolist(), labels.tolist()


class MaskedLMDataset(torch.utils.data.Dataset):
    """Map-style dataset of masked-LM examples `{"input_ids", "labels"}` over token sequences.

    `examples` are dicts with `input_ids` (e.g. `accumlab.data.corpus.lm_examples`) or plain id lists.
    Item i is masked with a generator seeded by (seed, epoch, i): the same item is the same
    masked example until `set_epoch` changes the epoch. With `repeats=r` the dataset holds every
    example r times, each copy with its own masks (copy j uses epoch `epoch + j`), so that one
    trainer epoch over it sees r different maskings of the corpus.
    """

    def __init__(self, examples: Sequence, *, mask_id: int = MASK_ID,
                 vocab_size: int = MASK_ID, probability: float = 0.15,
                 special_ids: Sequence[int] = (0, 1), seed: int = 0,
                 repeats: int = 1):
        self.examples = examples
        self.mask_id, self.vocab_size, self.probability = mask_id, vocab_size, probability
        self.special_ids, self.seed, self.epoch = tuple(special_ids), seed, 0
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.repeats = repeats

    def set_epoch(self, epoch: int) -> None:
        """Choose another set of masks (call between epochs)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples) * self.repeats

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        copy, i = divmod(index, len(self.examples))
        example = self.examples[i]
        ids = example["input_ids"] if isinstance(example, dict) else example
        epoch = self.epoch + copy
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + i)
        masked, labels = mask_tokens(ids, mask_id=self.mask_id, vocab_size=self.vocab_size,
                                     probability=self.probability,
                                     special_ids=self.special_ids, generator=g)
        return {"input_ids": masked, "labels": labels}
