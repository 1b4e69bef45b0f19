"""Where Hugging Face's Trainer, Accelerate and accumlab update differently, and why.

Same padded variable-length causal-LM data (22 examples of 5-40 tokens), same initial tiny
GPT-2, micro-batch 2 x 4 accumulation steps (windows of 4, 4 and 3 micro-batches), SGD at a
constant LR of 0.5, fp32 on CPU. Every optimizer step is compared with the exact update of its
window (one batch of the window's examples, token-mean loss, from the same parameters):
relative difference ||update - exact|| / ||exact|| and the norm ratio. The logic lives in
`accumlab.lab.semantics`; tests/test_semantics.py asserts the same facts.

    python benchmarks/framework_semantics.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from accumlab.lab import semantics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run every framework, print the per-window differences and the reasons."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the records to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = semantics.padded_lm_examples()
    results = semantics.side_by_side(data)
    windows = results["accumlab"]
    print(f"{len(data)} examples, micro {semantics.MICRO} x k {semantics.K}: windows of "
          f"{[w['micro_batches'] for w in windows]} micro-batches holding "
          f"{[w['label_tokens'] for w in windows]} label tokens (after the shift)")
    print("per window: relative difference to the exact update, and x its norm ratio")
    for line in semantics.format_side_by_side(results):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
