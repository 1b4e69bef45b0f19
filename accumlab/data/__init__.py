"""Offline data: the stdlib-docstring corpus, its tokenizer, the labelled classification set,
masked-LM examples and document packing. Builds on the engine (collation), never on the lab."""
