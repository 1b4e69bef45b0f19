"""Where Hugging Face's Trainer, Accelerate and accumlab update differently, and why.

Same padded variable-length causal-LM data (22 examples of 5-40 tokens), same initial tiny
GPT-2, micro-batch 2 x 4 accumulation steps (windows of 4, 4 and 3 micro-batches), SGD at a
constant LR of 0.5, fp32 on CPU. Every optimizer step is compared with the exact update of its
window (one batch of the window's examples, token-mean loss, from the same parameters):
relative difference ||update - exact|| / ||exact|| and the norm ratio. Beside the plain Trainer
and Accelerate rows stand the adapters of `accumlab.integrations` (ExactTrainer on a stock
GPT-2, AccelerateWindows in Accelerate's accumulate() loop). A second table does the same for
BERT sequence classification (14 examples, micro 2 x 3: windows of 3, 3 and 1 micro-batches,
SGD at 0.05), whose head ignores num_items_in_batch. The logic lives in
`accumlab.lab.semantics`; tests/test_semantics.py and tests/test_integrations.py assert the
same facts.

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

from accumlab.integrations import AccelerateWindows, ExactTrainer  # noqa: E402
from accumlab.lab import semantics  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Run every framework, print the per-window differences and the reasons."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="also write the records to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = semantics.padded_lm_examples()
    results = semantics.side_by_side(data, exact_trainer=ExactTrainer,
                                     accelerate_windows=AccelerateWindows)
    windows = results["accumlab"]
    print(f"GPT-2 causal LM: {len(data)} examples, micro {semantics.MICRO} x k {semantics.K}: "
          f"windows of {[w['micro_batches'] for w in windows]} micro-batches holding "
          f"{[w['items'] for w in windows]} label tokens (after the shift)")
    print("per window: relative difference to the exact update, and x its norm ratio")
    for line in semantics.format_side_by_side(results):
        print(line)
    bert = semantics.bert_side_by_side(ExactTrainer)
    print(f"\nBERT sequence classification: windows of "
          f"{[w['micro_batches'] for w in bert['accumlab']]} micro-batches holding "
          f"{[w['items'] for w in bert['accumlab']]} examples")
    for line in semantics.format_side_by_side(bert, semantics.BERT_EXPLANATIONS):
        print(line)
    if args.json:
        both = {"causal_lm": results, "bert_classification": bert}
        Path(args.json).write_text(json.dumps(both, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
