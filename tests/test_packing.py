"""Packing without cross-contamination and token-budget batching.

Packed rows (block-diagonal causal mask, restarting positions, -100 at each document's first
token) give every document the loss it has when run alone, and a packed window's gradient is
the sum over documents of their summed losses / N (N = label tokens), in float64.
"""

import random

import pytest
import torch

from accumlab.data.packing import (
    pack_documents,
    packed_forward,
    padded_size,
    padding_stats,
    padding_waste,
    per_document_losses,
)
from accumlab.engine.batching import token_budget_batches
from accumlab.engine.collate import block_causal_mask, packed_collate
from accumlab.engine.gradients import gradient_vector, relative_difference
from accumlab.engine.losses import IGNORE_INDEX, count_items, summed_loss
from accumlab.engine.models import make_model
from accumlab.engine.window import accumulate_gradients
from tests.helpers import random_lm_data

BLOCK = 40


@pytest.fixture(scope="module")
def documents():
    torch.set_num_threads(1)
    docs = random_lm_data(14, seed=3, min_len=3, max_len=BLOCK)
    docs += random_lm_data(4, seed=4, min_len=5, max_len=20, mask_prefix=True)  # prompts
    return docs


def _model(impl):
    model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64, attn_implementation=impl,
                       max_positions=64)
    return model.train()  # train mode, as in training: GPT-2 still builds a cache by default


def _alone(model, doc):
    ids = torch.tensor([doc["input_ids"]])
    labels = torch.tensor([doc["labels"]])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return float(summed_loss(logits, labels, "causal_lm")), count_items(labels, "causal_lm")


def _packed_per_document(model, rows, batch, forward):
    """{document index: (summed loss, label tokens)} from one forward pass of packed rows."""
    with torch.no_grad():
        logits = forward(model, batch)
    found = {}
    for row, segments in zip(rows, per_document_losses(logits, batch), strict=True):
        docs = list(dict.fromkeys(row["document_ids"]))  # the row's documents, in order
        assert len(segments) in (len(docs), len(docs) + 1)  # + the padding segment
        assert all(n == 0 for _, n in segments[len(docs):])
        found.update(zip(docs, segments))
    return found


CASES = [("sdpa", "float"), ("eager", "float"), ("sdpa", "bool"), ("sdpa", "position_ids"),
         ("eager", "position_ids")]


@pytest.mark.parametrize("impl,attention", CASES)
def test_packed_rows_give_each_document_its_own_loss(documents, impl, attention):
    model = _model(impl)
    rows = pack_documents(documents, BLOCK)
    assert len(rows) < len(documents)  # several documents share a row
    batch = packed_collate(rows, attention=attention, mask_dtype=torch.float64)
    found = _packed_per_document(model, rows, batch, packed_forward)
    worst = 0.0
    for index, doc in enumerate(documents):
        loss, n = _alone(model, doc)
        got = found[index]
        assert got[1] == n, f"document {index}: {got[1]} label tokens packed, {n} alone"
        if n:
            worst = max(worst, abs(got[0] - loss) / abs(loss))
    print(f"{impl}/{attention}: worst relative per-document loss difference {worst:.1e}")
    assert worst < 1e-12


def test_without_the_document_mask_documents_leak(documents):
    """Controls: each of these lets tokens see other documents, and the test notices."""
    model = _model("sdpa")
    rows = pack_documents(documents, BLOCK)
    full = packed_collate(rows, attention="position_ids")
    variants = {
        # plain concatenation: causal mask over the whole row, positions continue
        "no mask, no position_ids": lambda m, b: m(input_ids=b["input_ids"]).logits,
        # transformers 5.24 finds documents from position restarts only without a cache
        "position_ids, cache on": lambda m, b: m(input_ids=b["input_ids"],
                                                position_ids=b["position_ids"]).logits,
        # ... and never when a 2-D mask is given
        "position_ids + 2-D ones mask": lambda m, b: m(
            input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
            attention_mask=torch.ones_like(b["input_ids"])).logits,
    }
    for name, forward in variants.items():
        found = _packed_per_document(model, rows, full, forward)
        worst = max(abs(found[i][0] - _alone(model, d)[0]) / _alone(model, d)[0]
                    for i, d in enumerate(documents) if found[i][1])
        print(f"{name}: worst relative per-document loss difference {worst:.2e}")
        assert worst > 1e-3, f"{name} unexpectedly kept documents apart"
    eager = _model("eager")  # eager adds a bool mask to the scores as 0/1: wrong
    bool_batch = packed_collate(rows, attention="bool")
    found = _packed_per_document(eager, rows, bool_batch, packed_forward)
    assert max(abs(found[i][0] - _alone(eager, d)[0]) for i, d in enumerate(documents)) > 1e-3


@pytest.mark.parametrize("k", [1, 2])
def test_packed_window_gradient_is_the_sum_over_documents(documents, k):
    model = _model("sdpa")
    rows = pack_documents(documents, BLOCK)
    half = -(-len(rows) // k)
    batches = [packed_collate(rows[i:i + half], mask_dtype=torch.float64)
               for i in range(0, len(rows), half)]
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, batches, task="causal_lm", forward=packed_forward)
    packed = gradient_vector(model)

    n = sum(count_items(torch.tensor([d["labels"]]), "causal_lm") for d in documents)
    assert n == sum(count_items(b["labels"], "causal_lm") for b in batches)  # same N
    model.zero_grad(set_to_none=True)
    for doc in documents:
        logits = model(input_ids=torch.tensor([doc["input_ids"]]), use_cache=False).logits
        (summed_loss(logits, torch.tensor([doc["labels"]]), "causal_lm") / n).backward()
    alone = gradient_vector(model)
    diff = relative_difference(packed, alone)
    print(f"k={k}: packed vs documents alone, relative gradient difference {diff:.1e}")
    assert diff < 1e-12


def test_pack_documents_keeps_every_token_and_restarts_positions(documents):
    long_doc = {"input_ids": list(range(2, 2 + 2 * BLOCK + 5))}
    docs = documents + [long_doc]
    for strategy in ("first_fit", "in_order"):
        rows = pack_documents(docs, BLOCK, strategy=strategy)
        assert all(len(r["input_ids"]) <= BLOCK for r in rows)
        pieces = {}
        for r in rows:
            for t, lab, pos, d in zip(r["input_ids"], r["labels"], r["position_ids"],
                                      r["document_ids"], strict=True):
                pieces.setdefault(d, []).append((t, lab, pos))
        for piece in pieces.values():
            assert [p[2] for p in piece] == list(range(len(piece)))
            assert piece[0][1] == IGNORE_INDEX
        tokens = sorted(t for piece in pieces.values() for t, _, _ in piece)
        assert tokens == sorted(t for d in docs for t in d["input_ids"])
        assert len(pieces) == len(documents) + 3  # the long document became 3 pieces
    in_order = pack_documents(docs, BLOCK, strategy="in_order")
    order = [d for r in in_order for d in dict.fromkeys(r["document_ids"])]
    assert order == sorted(order)
    assert len(pack_documents(docs, BLOCK)) <= len(in_order)


def test_collate_pads_with_its_own_segment_and_checks_inputs(documents):
    rows = pack_documents(documents[:3], BLOCK, strategy="in_order")
    batch = packed_collate(rows, pad_to=BLOCK + 4)
    assert batch["input_ids"].shape == (len(rows), BLOCK + 4)
    mask = batch["attention_mask"]
    assert mask.shape == (len(rows), 1, BLOCK + 4, BLOCK + 4) and mask.dtype == torch.float32
    n = len(rows[0]["input_ids"])
    assert (mask[0, 0, n:, :n] < 0).all() and (mask[0, 0, :n, n:] < 0).all()  # pad isolated
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    allowed = block_causal_mask(positions, "bool")[0, 0]
    assert allowed.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    with pytest.raises(ValueError, match="attention"):
        packed_collate(rows, attention="2d")
    with pytest.raises(ValueError, match="pack_documents"):
        packed_collate([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(ValueError, match="block_size"):
        pack_documents(documents, 1)


def test_token_budget_batches_invariants():
    rng = random.Random(0)
    lengths = [rng.randint(1, 120) for _ in range(500)]
    for budget, rows in ((256, None), (1024, None), (1024, 8)):
        batches = token_budget_batches(lengths, budget, max_rows=rows)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(padded_size(lengths, b) <= budget for b in batches)
        if rows:
            assert all(len(b) <= rows for b in batches)
    assert token_budget_batches(lengths, 512, seed=1) == token_budget_batches(lengths, 512, seed=1)
    assert token_budget_batches(lengths, 512, seed=1) != token_budget_batches(lengths, 512, seed=2)
    # sorting by length pads far less than batching in the given order
    slots = {s: sum(padded_size(lengths, b) for b in token_budget_batches(
        lengths, 1024, sort_by_length=s)) for s in (True, False)}
    assert slots[True] < 0.8 * slots[False]
    with pytest.raises(ValueError, match="longer than max_tokens"):
        token_budget_batches(lengths, 100)


def test_padding_waste_orders_the_three_schemes():
    rng = random.Random(1)
    lengths = [max(2, int(rng.lognormvariate(3.5, 0.8))) for _ in range(2000)]
    waste = padding_waste(lengths, micro_batch_size=16, max_tokens=2048, block_size=128)
    fractions = {k: v["padding_fraction"] for k, v in waste.items()}
    print({k: f"{v:.1%}" for k, v in fractions.items()})
    assert len({v["real_tokens"] for v in waste.values()}) == 1
    assert 0 <= fractions["packed"] < 0.02 < fractions["token budget"] < fractions["padded"]
    pieces_stats = padding_stats([min(n, 128) for n in lengths], 16)
    assert pieces_stats["padding_fraction"] > 0.3  # the padded baseline really pads
