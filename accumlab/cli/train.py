"""`accumlab train`: train a model with exact gradient accumulation and print a summary."""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from accumlab.cli.args import EXIT_OK, RunStopped, UsageError, fraction, positive_int
from accumlab.cli.options import add_config_flags, config_from_args

MODEL_SIZES = ("tiny", "mini", "small", "medium", "gpt2-small")  # engine.models.SIZES


def add_parser(sub) -> None:
    """The `train` subcommand and its options."""
    p = sub.add_parser("train", help="train a model with exact gradient accumulation",
                       description="Train a model with exact gradient accumulation and print "
                                   "a summary.\nSettings come from --config (a TOML file), "
                                   "then from the flags, which override it.")
    p.add_argument("--config", metavar="FILE.toml",
                   help="TOML file of TrainConfig fields ([train] table or top-level keys)")
    p.add_argument("--data", default="corpus",
                   help="'corpus' (shipped text, causal LM), 'textclass' (shipped labelled set) "
                        "or a JSON Lines file with input_ids (and labels) or text per line "
                        "(default: corpus)")
    p.add_argument("--pretrained", metavar="FOLDER",
                   help="start from this model folder (from_pretrained) instead of a new model")
    p.add_argument("--arch", choices=("gpt2", "bert"),
                   help="architecture of a new model (default: gpt2 for text, bert for "
                        "textclass)")
    p.add_argument("--size", default="tiny", choices=MODEL_SIZES,
                   help="size of a new model (default: tiny)")
    p.add_argument("--dropout", type=fraction, default=0.0,
                   help="dropout of a new model, in [0, 1) (default: 0)")
    p.add_argument("--tokenizer", metavar="FOLDER",
                   help="tokenizer folder (default: the shipped one)")
    p.add_argument("--max-length", type=positive_int, default=128,
                   help="truncate examples to this many tokens (default: 128)")
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help="use only the first N training examples (default: all)")
    p.add_argument("--eval-limit", type=positive_int, default=256, metavar="N",
                   help="evaluation examples from the shipped data (default: 256)")
    p.add_argument("--eval-at-end", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate once at the end when --eval-every is not set (default: true)")
    p.add_argument("--save", metavar="FOLDER",
                   help="save the trained model and tokenizer to this new folder")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    """Train a model on the shipped corpus (or a JSON Lines file) and print a summary."""
    cfg = config_from_args(args)
    if not cfg.progress:  # before tqdm is imported: it reads TQDM_DISABLE on import
        os.environ["TQDM_DISABLE"] = "1"
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    _check_paths(args)
    import torch

    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: no CUDA GPU is visible to torch {torch.__version__}; "
                         "use --device auto or cpu")

    from accumlab.data.textclass import LABELS
    from accumlab.data.tokenizer import load_tokenizer
    from accumlab.engine import fsdp
    from accumlab.engine.checkpoint import CheckpointError
    from accumlab.engine.distributed import CollectiveError, is_main_process
    from accumlab.engine.models import load_model, make_model
    from accumlab.engine.trainer import train

    if not cfg.progress:  # transformers may have been imported already (main() in a notebook)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.tokenizer)
    task, train_data, eval_data = _load_data(args, tokenizer)
    if args.pretrained:
        try:
            model = load_model(args.pretrained, task=task)
        except (OSError, ValueError) as e:  # no such hub id offline, no or a bad config.json
            raise UsageError(f"--pretrained {args.pretrained}: cannot load a model there "
                             f"({e})") from None
    else:
        arch = args.arch or ("gpt2" if task == "causal_lm" else "bert")
        extra = {"num_labels": len(LABELS)} if task == "classification" else {}
        model = make_model(arch, args.size, task=task, seed=cfg.seed,
                           vocab_size=len(tokenizer), max_positions=max(args.max_length, 128),
                           dropout=args.dropout, **extra)
    if args.data not in ("corpus", "textclass"):
        _check_ids(train_data, model.get_input_embeddings().num_embeddings, args.data)
    if cfg.eval_every is None:
        eval_data = eval_data if args.eval_at_end else None
    try:
        result = train(model, train_data, cfg, eval_data=eval_data)
    except (FloatingPointError, torch.OutOfMemoryError, CheckpointError, CollectiveError) as e:
        raise RunStopped(str(e)) from e  # the engine's message says why and what to change
    if args.save:  # rank 0 writes (under FSDP after gathering the shards)
        fsdp.save_pretrained(model, args.save)
        if is_main_process():
            tokenizer.save_pretrained(args.save)
    print(summary_table(result))
    return EXIT_OK


def _check_paths(args) -> None:
    """Files and folders named by flags, checked before anything slow starts."""
    if args.data not in ("corpus", "textclass"):
        data = Path(args.data)
        if data.is_dir():
            raise UsageError(f"--data {args.data} is a folder; give a JSON Lines file, "
                             "'corpus' or 'textclass'")
        if not data.is_file():
            raise UsageError(f"--data {args.data}: no such file (or use 'corpus' or "
                             "'textclass')")
    if args.pretrained and not Path(args.pretrained).exists() and (
            os.sep in args.pretrained or args.pretrained.startswith(".")):
        raise UsageError(f"--pretrained {args.pretrained}: no such folder")
    if args.save and Path(args.save).exists() and (
            not Path(args.save).is_dir() or any(Path(args.save).iterdir())):
        raise UsageError(f"--save {args.save} already exists; give a new (or empty) folder, "
                         "nothing is overwritten")


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
    rows = read_jsonl(args.data, args.limit)
    task = "classification" if isinstance(rows[0].get("labels"), int) else "causal_lm"
    for r in rows:
        if "input_ids" not in r:
            ids = tokenizer(r["text"], truncation=True, max_length=args.max_length)["input_ids"]
            r["input_ids"] = ids
            r.setdefault("labels", list(ids))
    return task, rows, None


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """Examples from a JSON Lines file, one object per line with input_ids or text."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"--data {path} line {number}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not ("input_ids" in row or "text" in row):
                raise UsageError(f"--data {path} line {number}: each line needs an object "
                                 "with 'input_ids' or 'text'")
            row["_line"] = number
            rows.append(row)
            if limit and len(rows) == limit:
                break
    if not rows:
        raise UsageError(f"--data {path} holds no examples")
    return rows


def _check_ids(rows: list[dict], vocab: int, source: str) -> None:
    """Token ids must be integers in [0, vocab): name the line of the first that is not."""
    for i, row in enumerate(rows):
        ids = row.get("input_ids")
        bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < vocab] if isinstance(ids, list) else [ids]
        if bad:
            where = f"line {row['_line']}" if "_line" in row else f"example {i}"
            raise UsageError(f"--data {source} {where}: input_ids holds {bad[0]!r}; ids must be "
                             f"integers in 0..{vocab - 1} (the model's vocabulary)")
    for row in rows:
        row.pop("_line", None)


def summary_table(result) -> str:
    """Final summary of a run as aligned text."""
    from accumlab.engine.distributed import world_size

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
