"""`accumlab compare`: accumulated vs single-batch gradients on corpus text, by precision."""

from __future__ import annotations

from accumlab.cli.args import EXIT_OK, UsageError, positive_int
from accumlab.cli.train import MODEL_SIZES
from accumlab.engine.config import PRECISIONS


def add_parser(sub) -> None:
    """The `compare` subcommand and its options."""
    p = sub.add_parser("compare", help="accumulated vs single-batch gradients by precision",
                       description="Gradient of one window of corpus examples, accumulated over "
                                   "k micro-batches vs one batch, in each precision, each also "
                                   "against a float64 reference.")
    p.add_argument("--k", type=positive_int, nargs="+", default=[1, 2, 4, 8], metavar="K",
                   help="accumulation steps to compare (default: 1 2 4 8)")
    p.add_argument("--precision", nargs="+", default=["fp64", "fp32", "bf16"],
                   choices=PRECISIONS, metavar="P",
                   help=f"precisions, any of {', '.join(PRECISIONS)} (default: fp64 fp32 bf16)")
    p.add_argument("--examples", type=positive_int, default=32, metavar="N",
                   help="corpus examples in the window (default: 32)")
    p.add_argument("--size", default="tiny", choices=MODEL_SIZES,
                   help="GPT-2 model size (default: tiny)")
    p.add_argument("--max-length", type=positive_int, default=128, metavar="N",
                   help="tokens per example at most (default: 128)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args) -> int:
    """Print one row per (precision, k): relative differences of the gradients."""
    if max(args.k) > args.examples:
        raise UsageError(f"--k {max(args.k)} is more micro-batches than --examples "
                         f"{args.examples}")
    from accumlab.data.corpus import lm_examples
    from accumlab.data.tokenizer import load_tokenizer
    from accumlab.engine.models import make_model
    from accumlab.lab.equivalence import compare_gradients

    data = lm_examples(load_tokenizer(), "train", args.max_length, limit=args.examples)
    model = make_model("gpt2", args.size, max_positions=args.max_length)
    records = compare_gradients(model, data, ks=args.k, precisions=args.precision)
    print(f"{'precision':>9} {'k':>3} {'vs single':>11} {'vs fp64':>11} {'single vs fp64':>15}")
    for r in records:
        print(f"{r['precision']:>9} {r['k']:>3} {r['vs_single']:>11.2e} {r['vs_fp64']:>11.2e} "
              f"{r['single_vs_fp64']:>15.2e}")
    return EXIT_OK
