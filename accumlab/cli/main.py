"""The `accumlab` command line: train, demo, compare, check, plan."""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import typing

from accumlab.engine.config import TrainConfig
from accumlab.engine.distributed import world_size

DATASETS = ("corpus", "textclass")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (dashes for underscores); unset flags keep defaults."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training settings (TrainConfig fields)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        if f.name == "eval_every":
            group.add_argument(flag, type=_steps_or_epoch, default=None)
        elif f.name == "betas":
            group.add_argument(flag, type=float, nargs=2, default=None)
        elif "bool" in hint:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif "int" in hint and "float" not in hint:
            group.add_argument(flag, type=_none_or(int), default=None)
        elif "float" in hint:
            group.add_argument(flag, type=_none_or(float), default=None)
        else:
            group.add_argument(flag, type=_none_or(str), default=None)


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _steps_or_epoch(text: str):
    return "epoch" if text == "epoch" else int(text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from an optional TOML file, overridden by any flags given."""
    values = {}
    if args.config:
        values = TrainConfig.from_toml(args.config).to_dict()
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    if "max_steps" not in values and "epochs" not in values:
        values["max_steps"] = 50
    return TrainConfig.from_dict(values)


def _load_data(args, tokenizer):
    if args.data == "corpus":
        from accumlab.data.corpus import lm_examples

        train = lm_examples(tokenizer, "train", args.max_length, limit=args.limit)
        evals = lm_examples(tokenizer, "validation", args.max_length, limit=args.eval_limit)
        return "causal_lm", train, evals
    if args.data == "textclass":
        from accumlab.data.textclass import classification_examples

        train = classification_examples(tokenizer, "train", args.max_length, limit=args.limit)
        evals = classification_examples(tokenizer, "dev", args.max_length, limit=args.eval_limit)
        return "classification", train, evals
    rows = [json.loads(line) for line in open(args.data) if line.strip()]
    task = "classification" if isinstance(rows[0].get("labels"), int) else "causal_lm"
    if "input_ids" not in rows[0]:
        key = "text" if "text" in rows[0] else None
        if key is None:
            raise SystemExit(f"{args.data}: each line needs 'input_ids' or 'text'")
        for r in rows:
            ids = tokenizer(r["text"], truncation=True, max_length=args.max_length)["input_ids"]
            r["input_ids"] = ids
            r.setdefault("labels", list(ids))
    return task, rows[: args.limit] if args.limit else rows, None


def cmd_train(args) -> int:
    """Train a model on the shipped corpus (or a JSON Lines file) and print a summary."""
    from accumlab import train
    from accumlab.data.textclass import LABELS
    from accumlab.data.tokenizer import load_tokenizer
    from accumlab.engine.models import load_model, make_model

    cfg = config_from_args(args)
    tokenizer = load_tokenizer(args.tokenizer)
    task, train_data, eval_data = _load_data(args, tokenizer)
    if args.pretrained:
        model = load_model(args.pretrained, task=task)
    else:
        arch = args.arch or ("gpt2" if task == "causal_lm" else "bert")
        extra = {"num_labels": len(LABELS)} if task == "classification" else {}
        model = make_model(arch, args.size, task=task, seed=cfg.seed,
                           vocab_size=len(tokenizer), max_positions=max(args.max_length, 128),
                           dropout=args.dropout, **extra)
    if cfg.eval_every is None:
        eval_data = eval_data if args.eval_at_end else None
    result = train(model, train_data, cfg, eval_data=eval_data)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)
    print(summary_table(result))
    return 0


def summary_table(result) -> str:
    """Final summary of a run as aligned text."""
    h = [r for r in result.history if not r["skipped"]]
    rows = [("optimizer steps", f"{result.steps}"),
            ("effective batch", f"{result.config.micro_batch_size} micro x "
                                f"{result.config.accum_steps} steps x {world_size()} rank(s)"),
            ("first / last loss", f"{h[0]['loss']:.4f} / {h[-1]['loss']:.4f}" if h else "-"),
            ("median tokens/s", f"{statistics.median(r['tokens_per_s'] for r in h):,.0f}"
             if h else "-"),
            ("peak memory MiB", f"{max(r['peak_memory_mb'] for r in h):,.0f}" if h else "-"),
            ("total time s", f"{sum(r['time_s'] for r in h):.1f}")]
    if result.eval_metrics:
        for k, v in result.eval_metrics.items():
            rows.append((f"eval {k}", f"{v:.4f}"))
    if result.stopped_early:
        rows.append(("stopped early", f"best at step {result.best_step}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_demo(args) -> int:
    """Same model, same data: 1 micro-batch of 32 vs 8 micro-batches of 4."""
    from accumlab.cli.demo import format_demo, run_demo

    print(format_demo(run_demo(steps=args.steps, max_length=args.max_length)))
    return 0


def cmd_compare(args) -> int:
    """Accumulated vs single-batch gradients on corpus text, over k and precisions."""
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
    return 0


def cmd_check(args) -> int:
    """Run a user's accumulation step function (file.py:function) through check_loop."""
    import importlib.util
    from pathlib import Path

    from accumlab.doctor import check_loop

    path, sep, func = args.target.rpartition(":")
    if not sep or not path or not func:
        raise ValueError(f"expected path/to/file.py:function, got {args.target!r}")
    if not Path(path).is_file():
        raise FileNotFoundError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(Path(path).resolve().parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    step_fn = getattr(module, func, None)
    if not callable(step_fn):
        raise ValueError(f"{path} defines no function named {func!r}")
    result = check_loop(step_fn, accum_steps=args.accum_steps, name=func)
    print(result)
    return 0 if result.ok else 1


def cmd_plan(args) -> int:
    """Recommend micro-batch x accumulation steps (x checkpointing) for a GPU, and say why."""
    from pathlib import Path

    from accumlab.lab.memory import ModelShape
    from accumlab.lab.planner import parse_bytes, plan_training

    if Path(args.model).exists():  # a local config.json or model folder
        from accumlab.engine.models import load_config

        shape = ModelShape.from_config(load_config(args.model))
    else:
        shape = ModelShape.named(args.model)
    if args.seq_len > shape.positions:
        raise ValueError(f"--seq-len {args.seq_len} is longer than {args.model}'s "
                         f"{shape.positions} positions")
    gpu = parse_bytes(args.gpu_memory)
    plan = plan_training(gpu, shape, args.seq_len, args.global_batch_tokens, args.precision,
                         attention=args.attention, checkpointing=args.checkpointing,
                         loss_chunk_size=args.loss_chunk_size, ranks=args.ranks,
                         headroom=args.headroom, optimizer=args.optimizer)
    print(f"{args.model} on {args.gpu_memory} ({gpu / 2**30:.2f} GiB) per GPU, "
          f"{args.precision}, {args.attention} attention, checkpointing {args.checkpointing}")
    print(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `accumlab` command."""
    parser = argparse.ArgumentParser(prog="accumlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with exact gradient accumulation")
    p.add_argument("--config", help="TOML file of TrainConfig fields ([train] table)")
    p.add_argument("--data", default="corpus",
                   help="'corpus' (shipped LM text), 'textclass' (shipped labelled set) or a "
                        "JSON Lines file with input_ids/labels or text")
    p.add_argument("--pretrained", help="local folder or hub id for from_pretrained")
    p.add_argument("--arch", choices=("gpt2", "bert"))
    p.add_argument("--size", default="tiny")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--tokenizer", help="tokenizer folder (default: the shipped one)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--limit", type=int, help="use only the first N training examples")
    p.add_argument("--eval-limit", type=int, default=256)
    p.add_argument("--eval-at-end", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--save", help="save the trained model and tokenizer here")
    _add_config_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="1 x 32 vs 8 x 4 on a tiny GPT-2, side by side")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("compare", help="accumulated vs single-batch gradients by precision")
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--precision", nargs="+", default=["fp64", "fp32", "bf16"])
    p.add_argument("--examples", type=int, default=32)
    p.add_argument("--size", default="tiny")
    p.add_argument("--max-length", type=int, default=128)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("check", help="check your accumulation step function against the exact "
                                     "window update and name its bugs")
    p.add_argument("target", help="path/to/file.py:function, called as function(model, "
                                  "optimizer, micro_batches, accum_steps, *, scheduler=None, "
                                  "scaler=None, loss_fn=None, max_grad_norm=None)")
    p.add_argument("--accum-steps", type=int, default=4)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("plan", help="recommend micro-batch x accumulation steps for a GPU "
                                    "from the memory model, and say why")
    p.add_argument("--gpu-memory", required=True,
                   help="memory of one GPU: 16GB (10^9 bytes), 16GiB or 80G (2^30 bytes)")
    p.add_argument("--model", default="gpt2-small",
                   help="a model name (gpt2-small, gpt2-medium, bert-base, llama-3.2-1b, "
                        "llama-3.1-8b, tinyllama-1.1b, accumlab's tiny..medium) or a local "
                        "config.json / model folder")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--global-batch-tokens", type=int, required=True,
                   help="tokens per optimizer step over all ranks")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16", "fp64"))
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
    p.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"))
    chunk = TrainConfig.__dataclass_fields__["loss_chunk_size"].default
    p.add_argument("--loss-chunk-size", type=_none_or(int), default=chunk,
                   help="positions per cross-entropy chunk, or none for one piece (default: "
                        f"TrainConfig.loss_chunk_size = {chunk})")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "sgd_momentum"))
    p.add_argument("--ranks", type=int, default=1, help="data-parallel GPUs")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of the GPU kept free for the CUDA context and allocator")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `accumlab` console script."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"accumlab {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
