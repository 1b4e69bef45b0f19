"""The project's byte-level BPE tokenizer (vocabulary 4096), shipped in ``data/tokenizer/``.

It was trained with the ``tokenizers`` library on the train split of the docstring corpus
(``accumlab.data.corpus``). Special tokens: ``<|endoftext|>`` (id 0; EOS and BOS) and ``<pad>``
(id 1); padding is on the right. The committed files are the reference on every machine;
``python -m accumlab.data.tokenizer --rebuild`` retrains them from this machine's corpus.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from accumlab.data.paths import data_dir

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
VOCAB_SIZE = 4096


def default_tokenizer_dir() -> Path:
    """The shipped tokenizer folder, ``data_dir()/"tokenizer"``."""
    return data_dir() / "tokenizer"


def _wrap(backend):
    """Wrap a ``tokenizers.Tokenizer`` as a transformers fast tokenizer with our specials."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, padding_side="right", clean_up_tokenization_spaces=False,
    )


def train_tokenizer(texts, vocab_size: int = VOCAB_SIZE, out_dir=None):
    """Train a byte-level BPE on ``texts``; save it with ``save_pretrained`` if ``out_dir``.

    Returns the ``PreTrainedTokenizerFast``. Special tokens get ids 0 (EOS) and 1 (pad).
    """
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2,
                            special_tokens=[EOS_TOKEN, PAD_TOKEN], show_progress=False)
    tok = _wrap(bpe._tokenizer)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(path=None):
    """Load the shipped tokenizer, or ``AutoTokenizer.from_pretrained(path)`` for any other.

    ``path`` may be a local folder or, for online users, a hub name. Missing special tokens
    are filled in: ``<|endoftext|>``/``<pad>`` when the vocabulary has them, else the EOS token
    as pad token, so that ``padding=True`` works.
    """
    from transformers import AutoTokenizer

    if path is None:
        path = default_tokenizer_dir()
        if not (path / "tokenizer.json").exists():
            raise FileNotFoundError(
                f"{path / 'tokenizer.json'} is missing: restore it from git "
                "(`git checkout -- data/tokenizer`) or run `python -m accumlab.data.tokenizer "
                "--rebuild`."
            )
    tok = AutoTokenizer.from_pretrained(str(path))
    vocab = tok.get_vocab()
    if tok.eos_token is None and EOS_TOKEN in vocab:  # e.g. a folder with only tokenizer.json
        tok.eos_token = tok.bos_token = EOS_TOKEN
    if tok.pad_token is None:
        tok.pad_token = PAD_TOKEN if PAD_TOKEN in vocab else tok.eos_token
    return tok


def main(argv=None) -> None:
    """``--rebuild`` retrains ``data/tokenizer``; without it, print the shipped one's stats."""
    import time

    from accumlab.data.corpus import lm_examples, load_corpus, percentiles

    parser = argparse.ArgumentParser(prog="python -m accumlab.data.tokenizer", description=main.__doc__)
    parser.add_argument("--rebuild", action="store_true",
                        help="retrain on this machine's corpus and overwrite data/tokenizer")
    args = parser.parse_args(argv)
    if args.rebuild:
        t0 = time.perf_counter()
        train_tokenizer(load_corpus("train"), out_dir=default_tokenizer_dir())
        print(f"trained and saved to {default_tokenizer_dir()} in "
              f"{time.perf_counter() - t0:.1f} s")
    tok = load_tokenizer()
    print(f"vocab {len(tok)}, eos {tok.eos_token!r}={tok.eos_token_id}, "
          f"pad {tok.pad_token!r}={tok.pad_token_id}, padding side {tok.padding_side}")
    for split in ("train", "validation"):
        texts = load_corpus(split)
        t0 = time.perf_counter()
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        secs = time.perf_counter() - t0
        n_tok, n_bytes = sum(map(len, ids)), sum(len(t.encode("utf-8")) for t in texts)
        exact = all(tok.decode(i) == t for i, t in zip(ids, texts, strict=True))
        print(f"{split:>10}: {n_tok} tokens, {n_bytes / n_tok:.2f} bytes/token, "
              f"encoded in {secs:.2f} s, exact round trip: {exact}")
        lengths = [len(i) + 1 for i in ids]  # one EOS per document
        ex_len = [len(e["input_ids"]) for e in lm_examples(tok, split, max_length=128)]
        print(f"{'':>10}  tokens/doc incl. EOS percentiles {percentiles(lengths)}")
        print(f"{'':>10}  lm_examples(max_length=128): {len(ex_len)} examples, "
              f"length percentiles {percentiles(ex_len)}")


if __name__ == "__main__":
    main()
