"""Accumulated vs single-batch gradients per precision: the table lesson 03 quotes from a GPU.

    python benchmarks/equivalence_table.py                       # GPT-2 small, 32 x 256, CUDA
    python benchmarks/equivalence_table.py --size tiny --seq-len 16 --device cpu   # a quick try

For each precision (fp32 with TF32 off, TF32 on a GPU, bf16 and fp16 autocast, fp16 without
loss scaling) it prints accumulated vs single batch at k micro-batches, the single batch vs the
float64 gradient and their ratio: the rows of `accumlab.lab.equivalence.REFERENCE_H100`, whose
source file is benchmarks/results/equivalence_h100.txt. Write a new source file with --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accumlab.data.corpus import lm_examples  # noqa: E402
from accumlab.data.tokenizer import load_tokenizer  # noqa: E402
from accumlab.engine.models import SIZES, make_model  # noqa: E402
from accumlab.lab.equivalence import GradientComparison, with_ratio  # noqa: E402


def table(size: str, seq_len: int, examples: int, k: int, device: str) -> tuple[str, list[dict]]:
    """The setting (one line) and one record per precision, with `ratio`."""
    tokenizer = load_tokenizer()
    data = lm_examples(tokenizer, "train", max_length=seq_len, limit=examples)
    model = make_model("gpt2", size, seed=0, max_positions=max(seq_len, 256))
    comparison = GradientComparison(model, data, pad_token_id=tokenizer.pad_token_id,
                                     device=device)
    records = [comparison.record(p, k) for p in ("fp32", "bf16", "fp16")]
    if device == "cuda":  # TF32 matmuls: fp32 storage, 10-bit mantissa products
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            tf32 = GradientComparison(model, data, pad_token_id=tokenizer.pad_token_id,
                                      device=device).record("fp32", k)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False
        records.insert(1, {**tf32, "precision": "tf32"})
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    setting = (f"{name}, GPT-2 {size} (vocabulary {model.config.vocab_size}), {len(data)} "
               f"sequences of at most {seq_len} tokens (N = {comparison.items} loss tokens), "
               f"k = {k}, torch {torch.__version__}")
    return setting, with_ratio(records)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="gpt2-small", choices=list(SIZES),
                        help="model size (default: gpt2-small, 124M parameters)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence at most")
    parser.add_argument("--examples", type=int, default=32, help="sequences in the batch")
    parser.add_argument("--k", type=int, default=4, help="accumulated micro-batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    setting, rows = table(args.size, args.seq_len, args.examples, args.k, args.device)
    lines = [setting, f"{'precision':<10} {'accumulated vs single':>22} "
             f"{'single batch vs fp64':>21} {'ratio':>6}"]
    lines += [f"{r['precision']:<10} {r['vs_single']:>22.2e} {r['single_vs_fp64']:>21.2e} "
              f"{r['ratio']:>6.2f}" for r in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
