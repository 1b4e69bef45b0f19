"""Tests of the offline data layer: paths, corpus, tokenizer, text-classification set."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest

from accumlab.data import corpus, paths, textclass
from accumlab.data.corpus import lm_examples, load_corpus, load_corpus_records, percentiles
from accumlab.data.textclass import LABELS, classification_examples, load_classification
from accumlab.data.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# --- paths ------------------------------------------------------------------------------


def test_data_dir_default_has_tokenizer():
    assert (paths.data_dir() / "tokenizer" / "tokenizer.json").is_file()


def test_missing_data_dir_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("ACCUMLAB_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ACCUMLAB_DATA"):
        paths.data_dir()


def test_cache_dir_env_override_is_created(monkeypatch, tmp_path):
    target = tmp_path / "a" / "cache"
    monkeypatch.setenv("ACCUMLAB_CACHE", str(target))
    assert paths.cache_dir() == target and target.is_dir()


# --- corpus -----------------------------------------------------------------------------


def test_corpus_is_real_sizeable_and_clean():
    records = load_corpus_records("all")
    texts = [r["text"] for r in records]
    assert len(records) > 2000 and sum(map(len, texts)) > 500_000
    names = [r["name"] for r in records]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert len(set(texts)) == len(texts)
    assert min(map(len, texts)) >= corpus.MIN_CHARS
    assert all(set(r) == {"name", "module", "text", "split"} for r in records)
    assert any("thread" in t.lower() for t in texts) and any("socket" in t for t in texts)


def test_corpus_loads_are_deterministic():
    assert load_corpus("train") == load_corpus("train")
    assert load_corpus_records("validation") == load_corpus_records("validation")


def test_corpus_extraction_is_deterministic(tmp_path):
    a = corpus.build_corpus(tmp_path / "a.jsonl").read_bytes()
    b = corpus.build_corpus(tmp_path / "b.jsonl").read_bytes()
    assert a == b
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temp file


def test_corpus_splits_are_disjoint_and_cover_all():
    train = {r["name"] for r in load_corpus_records("train")}
    val = {r["name"] for r in load_corpus_records("validation")}
    every = {r["name"] for r in load_corpus_records("all")}
    assert not train & val and train | val == every
    assert 0.02 < len(val) / len(every) < 0.10


def test_bad_split_names_the_choices():
    with pytest.raises(ValueError, match="train, validation, all"):
        load_corpus("test")


def test_document_token_lengths_vary(tok):
    lengths = [len(ids) for ids in tok(load_corpus("train"), add_special_tokens=False)["input_ids"]]
    p = percentiles(lengths, (10, 90))
    assert p[90] / p[10] >= 4
    assert max(lengths) > 4 * 128  # some documents need several max_length chunks


def test_percentiles_nearest_rank():
    assert percentiles(range(1, 101), (10, 50, 90, 100)) == {10: 10, 50: 50, 90: 90, 100: 100}
    assert percentiles([7], (10, 90)) == {10: 7, 90: 7}


# --- tokenizer --------------------------------------------------------------------------


def test_tokenizer_special_tokens(tok):
    assert len(tok) == 4096
    assert tok.convert_tokens_to_ids(EOS_TOKEN) == 0 and tok.eos_token_id == 0
    assert tok.bos_token_id == 0
    assert tok.convert_tokens_to_ids(PAD_TOKEN) == 1 and tok.pad_token_id == 1
    assert tok.padding_side == "right"
    assert tok("a b")["input_ids"][-1] not in (0, 1)  # no special tokens added by default


@pytest.mark.parametrize("text", [
    "Return the number of items in a container.",
    "  leading spaces,\ttabs\nand new lines  .  ,  trailing ",
    "naïve café — 数据 🙂 \x00 \\u1234",
])
def test_tokenizer_round_trips_exactly(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_tokenizer_round_trips_validation_corpus(tok):
    texts = load_corpus("validation")
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    assert [tok.decode(i) for i in ids] == texts
    assert 3.0 < sum(map(len, texts)) / sum(map(len, ids)) < 5.0  # chars per token


def test_tokenizer_batch_padding(tok):
    texts = ["short", "a much longer sentence about sockets, threads and files"]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[0] == 2 and ids.shape == mask.shape
    n_short = len(tok(texts[0])["input_ids"])
    assert mask[0].tolist() == [1] * n_short + [0] * (ids.shape[1] - n_short)
    assert (ids[0, n_short:] == 1).all() and mask[1].all()


def test_load_tokenizer_from_saved_dir_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)
    text = "Open a socket and send the data."
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert (again.eos_token_id, again.pad_token_id, again.padding_side) == (0, 1, "right")


def test_load_tokenizer_from_bare_tokenizer_json(tok, tmp_path):
    shutil.copy(paths.data_dir() / "tokenizer" / "tokenizer.json", tmp_path / "tokenizer.json")
    bare = load_tokenizer(tmp_path)
    assert (bare.eos_token_id, bare.bos_token_id, bare.pad_token_id) == (0, 0, 1)
    batch = bare(["a", "a b c d"], padding=True)["input_ids"]
    assert len(batch[0]) == len(batch[1]) and batch[0][-1] == 1


def test_train_tokenizer_small(tmp_path):
    texts = load_corpus("validation")
    small = train_tokenizer(texts, vocab_size=400, out_dir=tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert small.eos_token_id == 0 and small.pad_token_id == 1 and len(small) <= 400
    assert small.decode(small(texts[0])["input_ids"]) == texts[0]
    assert load_tokenizer(tmp_path).get_vocab() == small.get_vocab()


# --- language-model examples ------------------------------------------------------------


def test_lm_examples_vary_and_respect_max_length(tok):
    ex = lm_examples(tok, "validation", max_length=64)
    lengths = [len(e["input_ids"]) for e in ex]
    assert max(lengths) == 64 and min(lengths) >= 8
    assert len(set(lengths)) > 20
    for e in ex:
        assert e["labels"] == e["input_ids"] and e["labels"] is not e["input_ids"]
    n_docs = len(load_corpus("validation"))
    assert len(ex) > n_docs  # long documents became several chunks
    assert sum(e["input_ids"].count(tok.eos_token_id) for e in ex) <= n_docs


def test_lm_examples_limit_truncate_and_checks(tok):
    ex = lm_examples(tok, "train", max_length=32, limit=50, min_tokens=4)
    assert len(ex) == 50 and all(4 <= len(e["input_ids"]) <= 32 for e in ex)
    first = lm_examples(tok, "validation", max_length=32, truncate=True)
    assert len(first) <= len(load_corpus("validation"))
    assert all(len(e["input_ids"]) <= 32 for e in first)
    with pytest.raises(ValueError, match="min_tokens"):
        lm_examples(tok, "validation", max_length=8, min_tokens=9)


# --- text classification ----------------------------------------------------------------


def test_classification_splits_disjoint_and_sized():
    data = {s: load_classification(s) for s in textclass.SPLITS}
    texts = {s: {r["text"] for r in rows} for s, rows in data.items()}
    assert not texts["train"] & texts["dev"]
    assert not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    assert len(data["train"]) >= 1500 and len(data["dev"]) >= 200 and len(data["test"]) >= 200
    assert all(set(r) == {"text", "label"} for rows in data.values() for r in rows)
    assert max(len(r["text"]) for rows in data.values() for r in rows) <= textclass.MAX_CHARS


def test_classification_labels_in_range_and_balanced():
    assert 3 <= len(LABELS) <= 5
    for split in textclass.SPLITS:
        counts = Counter(r["label"] for r in load_classification(split))
        assert set(counts) == set(range(len(LABELS)))
        assert len(set(counts.values())) == 1, (split, counts)


def test_classification_order_interleaves_classes():
    labels = [r["label"] for r in load_classification("train")[:40]]
    assert len(set(labels)) == len(LABELS)


def test_classification_bad_split():
    with pytest.raises(ValueError, match="train, dev, test"):
        load_classification("validation")


def test_classification_examples(tok):
    ex = classification_examples(tok, "dev", max_length=48)
    rows = load_classification("dev")
    assert len(ex) == len(rows)
    lengths = [len(e["input_ids"]) for e in ex]
    assert max(lengths) == 48 and len(set(lengths)) > 10
    assert all(e["input_ids"][-1] == tok.eos_token_id for e in ex)
    assert [e["labels"] for e in ex] == [r["label"] for r in rows]
    assert len(classification_examples(tok, "test", limit=7)) == 7


def test_classification_is_learnable():
    acc = textclass.bow_baseline()
    assert acc["test"] >= 0.65 and acc["dev"] >= 0.65


def test_split_text_pieces():
    text = ("First paragraph, which is long enough to keep.\n\n" + "word " * 300
            + "\n\nThe last paragraph, also long enough to be kept.")
    pieces = textclass.split_text(text, max_chars=100)
    assert all(len(p) <= 100 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())
