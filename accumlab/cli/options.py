"""One `accumlab train` flag per TrainConfig field, and the config they build with a TOML file.

Flags override the TOML file, and both are merged before TrainConfig checks anything, so a TOML
file without `max_steps` plus `--max-steps 10` is a valid run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from accumlab.cli.args import UsageError, none_or
from accumlab.engine import config as C
from accumlab.engine.config import TrainConfig

DEFAULT_MAX_STEPS = 50  # when neither the TOML file nor a flag sets max_steps or epochs

CHOICES = {
    "optimizer": C.OPTIMIZERS,
    "schedule": C.SCHEDULES,
    "precision": C.PRECISIONS,
    "loss_normalization": C.NORMALIZATIONS,
    "partial_window": C.PARTIAL_WINDOW_POLICIES,
    "device": C.DEVICES,
    "task": ("auto",) + C.TASKS,
    "eval_metric": C.EVAL_METRICS,
    "lr_scaling": C.LR_SCALINGS,
    "parallel": C.PARALLEL,
}

# What each field means, as `accumlab train --help` shows it (allowed values and the default
# are added from TrainConfig itself).
MEANING = {
    "micro_batch_size": "sequences (examples) per forward pass",
    "accum_steps": "micro-batches per optimizer step; effective batch = micro x accum x ranks",
    "max_steps": "optimizer steps to run; set this or --epochs",
    "epochs": "passes over the training data, instead of --max-steps",
    "lr": "peak learning rate",
    "optimizer": "optimizer",
    "weight_decay": "weight decay",
    "momentum": "SGD momentum (sgd only)",
    "betas": "AdamW betas, two numbers (adamw only)",
    "warmup_steps": "optimizer steps of linear learning-rate warmup",
    "schedule": "learning-rate schedule after warmup",
    "min_lr_ratio": "floor of the linear/cosine decay, as a fraction of --lr",
    "clip_grad_norm": "clip the accumulated gradient to this norm; none = no clipping",
    "precision": "arithmetic: fp64, fp32, or bf16/fp16 autocast (gradients kept in fp32)",
    "loss_normalization": "tokens = sum of losses / tokens in the window (exact); samples = "
                          "per example; mean_of_means = the classic bug, for teaching",
    "partial_window": "a short last window: step (normalised by its own count) or drop it",
    "shuffle": "shuffle the training data every epoch",
    "seed": "random seed (model initialisation, shuffling, dropout)",
    "device": "auto = a CUDA GPU when one is visible, else the CPU",
    "compile": "one compiled region per micro-batch: model, output layer and loss (fused)",
    "task": "auto = from the model class",
    "eval_every": "evaluate every N optimizer steps, or 'epoch'; none = at the end only",
    "eval_batch_size": "examples per evaluation batch; none = the micro-batch size",
    "eval_metric": "metric for early stopping and the best checkpoint",
    "early_stopping_patience": "stop after N evaluations without improvement (needs "
                               "--eval-every)",
    "checkpoint_dir": "folder for checkpoints",
    "checkpoint_every": "optimizer steps between checkpoints (needs --checkpoint-dir)",
    "resume_from": "a checkpoint folder, or 'latest' in --checkpoint-dir",
    "run_dir": "append one JSON line per optimizer step to RUN_DIR/history.jsonl",
    "progress": "show progress bars; --no-progress hides every one",
    "pad_token_id": "padding id; none = the model config's pad id, else 0",
    "lr_scaling": "scale --lr with the effective batch: linear or sqrt of (effective / "
                  "--base-batch)",
    "base_batch": "effective batch (sequences) at which --lr was tuned",
    "batch_ramp_tokens": "grow the window from 1 to --accum-steps micro-batches over this many "
                         "tokens; 0 = off",
    "seq_len_warmup_steps": "grow sequences from --seq-len-start to full length over these "
                            "optimizer steps; 0 = off",
    "seq_len_start": "sequence length at step 0 of the sequence-length warmup",
    "noise_scale": "record the gradient noise scale B_simple every step",
    "gradient_checkpointing": "recompute block activations in the backward: less memory, "
                              "more time",
    "loss_chunk_size": "positions per cross-entropy chunk; none = one piece",
    "micro_batch_tokens": "token-budget micro-batches: padded tokens (rows x longest) per "
                          "micro-batch; none = --micro-batch-size rows",
    "keep_last": "step checkpoints kept (plus the best); none keeps them all",
    "collective_timeout_s": "DDP: seconds a rank waits for the others before it stops with "
                            "an error",
    "validate_data": "check every example's ids, lengths and labels before training",
    "parallel": "under torchrun: ddp replicates the model on every rank, fsdp shards "
                "weights, gradients and optimizer states over the ranks",
    "sync_every_micro_batch": "fsdp: reduce-scatter gradients after every micro-batch "
                              "(less memory, k times the traffic), not once per window",
}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (dashes for underscores); unset flags keep defaults."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("training settings (TrainConfig fields; flags override "
                                      "--config)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        meaning = MEANING.get(f.name, f"TrainConfig.{f.name}")
        shown = (f"{DEFAULT_MAX_STEPS} when neither this nor --epochs is set"
                 if f.name == "max_steps" else _shown(default))
        kw = dict(default=argparse.SUPPRESS, help=f"{meaning} (default: {shown})")
        if f.name in CHOICES:
            kw.update(choices=CHOICES[f.name])
        elif f.name == "eval_every":
            kw.update(type=none_or(_steps_or_epoch), metavar="N|epoch")
        elif f.name == "betas":
            kw.update(type=float, nargs=2, metavar=("BETA1", "BETA2"))
        elif "bool" in hint:
            kw.update(action=argparse.BooleanOptionalAction)
        elif "int" in hint and "float" not in hint:
            kw.update(type=none_or(int), metavar="N")
        elif "float" in hint:
            kw.update(type=none_or(float), metavar="X")
        else:
            kw.update(type=none_or(str), metavar=f.name.split("_")[-1].upper())
        group.add_argument(flag, **kw)


def _shown(default) -> str:
    if default is None:
        return "none"
    if isinstance(default, tuple):
        return " ".join(map(str, default))
    return str(default).lower() if isinstance(default, bool) else str(default)


def _steps_or_epoch(text: str):
    if text == "epoch":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of steps, 'epoch' or 'none', "
                                         f"got {text!r}") from None


def read_toml(path: str) -> dict:
    """The TrainConfig fields in a TOML file (its `[train]` table or top-level keys)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"--config {path} is a folder; give a TOML file")
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--config {path} is not valid TOML: {e}") from None
    values = data.get("train", data)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown TrainConfig fields {unknown}; "
                         f"known: {sorted(known)}")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from an optional TOML file, overridden by any flags given."""
    values = read_toml(args.config) if args.config else {}
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if hasattr(args, f.name)}  # only the flags given (their default is SUPPRESS)
    # a flag for one length of run replaces the file's other one
    if "max_steps" in flags and "epochs" not in flags:
        values.pop("epochs", None)
    if "epochs" in flags and "max_steps" not in flags:
        values.pop("max_steps", None)
    values.update(flags)
    if values.get("max_steps") is None and values.get("epochs") is None:
        values["max_steps"] = DEFAULT_MAX_STEPS
    return TrainConfig.from_dict(values)
