"""What the up-front example check costs, next to one epoch of collation on the same data.

    python benchmarks/bench_validate.py [--examples 5000] [--max-length 128] [--repeat 5]

Takes the shipped corpus's causal-LM examples (accumlab.data.corpus.lm_examples), then times
`validate.check_examples` (every example: ids, lengths, labels, fingerprint) and the default
collator over one epoch of micro-batches of 8. Prints the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

from accumlab.data.corpus import lm_examples
from accumlab.data.tokenizer import load_tokenizer
from accumlab.engine.collate import pad_collate
from accumlab.engine.models import make_model
from accumlab.engine.validate import check_examples, model_limits


def _median_s(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    data = lm_examples(load_tokenizer(), max_length=args.max_length, limit=args.examples)
    tokens = sum(len(d["input_ids"]) for d in data)
    limits = model_limits(make_model("gpt2", "tiny", max_positions=args.max_length))
    check = _median_s(lambda: check_examples(data, limits, "causal_lm"), args.repeat)
    collate = _median_s(lambda: [pad_collate(data[i:i + 8], 1) for i in range(0, len(data), 8)],
                        args.repeat)
    print(f"{len(data)} examples, {tokens} tokens")
    print(f"check_examples (all examples): {check * 1000:.1f} ms "
          f"({check / len(data) * 1e6:.1f} us per example)")
    print(f"one epoch of pad_collate, micro-batches of 8: {collate * 1000:.1f} ms")
    print(f"ratio check / collate: {check / collate:.2f}")


if __name__ == "__main__":
    main()
