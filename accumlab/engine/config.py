"""TrainConfig: every setting of a training run, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, fields

PRECISIONS = ("fp64", "fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")
LR_SCALINGS = ("none", "linear", "sqrt")
EVAL_METRICS = ("loss", "accuracy", "f1", "perplexity")
BOOLEANS = ("shuffle", "compile", "progress", "noise_scale", "gradient_checkpointing",
            "validate_data", "sync_every_micro_batch")
TASKS = ("causal_lm", "masked_lm", "classification")
NORMALIZATIONS = ("tokens", "samples", "mean_of_means")
PARTIAL_WINDOW_POLICIES = ("step", "drop")
PARALLEL = ("ddp", "fsdp")

# Fields that change the arithmetic of a run: a checkpoint made under other values can't resume.
RESUME_FIELDS = (
    "micro_batch_size", "accum_steps", "lr", "optimizer", "weight_decay", "momentum", "betas",
    "warmup_steps", "schedule", "min_lr_ratio", "clip_grad_norm", "precision",
    "loss_normalization", "partial_window", "shuffle", "seed", "task", "lr_scaling", "base_batch",
    "batch_ramp_tokens", "seq_len_warmup_steps", "seq_len_start", "micro_batch_tokens",
)


@dataclass
class TrainConfig:
    """Settings of `accumlab.train`. Effective batch = micro_batch_size x accum_steps x ranks.

    Set either `max_steps` (optimizer steps) or `epochs`. Schedules and `eval_every`,
    `checkpoint_every` count optimizer steps, never micro-batches.
    """

    micro_batch_size: int = 8
    accum_steps: int = 1
    max_steps: int | None = None
    epochs: float | None = None
    lr: float = 3e-4
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW only
    warmup_steps: int = 0
    schedule: str = "constant"
    min_lr_ratio: float = 0.0  # floor of linear/cosine decay, as a fraction of lr
    clip_grad_norm: float | None = None
    precision: str = "fp32"
    loss_normalization: str = "tokens"
    partial_window: str = "step"
    shuffle: bool = True
    seed: int = 0
    device: str = "auto"
    compile: bool = False  # one compiled graph per micro-batch (accumlab.engine.compiled)
    task: str = "auto"
    eval_every: int | str | None = None  # optimizer steps, or "epoch"
    eval_batch_size: int | None = None
    eval_metric: str = "loss"
    early_stopping_patience: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume_from: str | None = None  # a checkpoint folder, or "latest" in checkpoint_dir
    run_dir: str | None = None  # history.jsonl is appended here
    progress: bool = True
    pad_token_id: int | None = None  # default: the model config's pad id, else 0
    # large batches and long sequences
    lr_scaling: str = "none"  # "linear" or "sqrt": lr x (effective / base_batch) or its sqrt
    base_batch: int | None = None  # effective batch (sequences) at which lr was tuned
    batch_ramp_tokens: int = 0  # window grows from 1 to accum_steps micro-batches over these
    seq_len_warmup_steps: int = 0  # truncate sequences, growing to full length over these steps
    seq_len_start: int = 64  # the truncation length at step 0
    noise_scale: bool = False  # record the gradient noise scale B_simple every step
    gradient_checkpointing: bool = False  # recompute block activations in the backward
    loss_chunk_size: int | None = 8192  # positions per cross-entropy chunk (None: one piece)
    micro_batch_tokens: int | None = None  # token-budget micro-batches (rows x longest)
    # faults
    keep_last: int | None = 3  # step checkpoints kept (plus "best"); None keeps them all
    collective_timeout_s: float = 300.0  # DDP: a rank waiting this long on the others stops
    validate_data: bool = True  # check every example's ids, lengths and labels before training
    # under torchrun: "ddp" replicates the model, "fsdp" shards it (accumlab.engine.fsdp)
    parallel: str = "ddp"
    sync_every_micro_batch: bool = False  # fsdp: reduce-scatter every micro-batch, not once

    def __post_init__(self):
        for name in ("lr", "weight_decay", "momentum", "min_lr_ratio", "clip_grad_norm",
                     "epochs", "collective_timeout_s"):
            _number(self, name)
        for name in BOOLEANS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"TrainConfig.{name} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        _positive_int(self, "micro_batch_size", "the number of sequences per forward pass")
        _positive_int(self, "accum_steps", "micro-batches per optimizer step; 1 = no accumulation")
        if self.max_steps is None and self.epochs is None:
            raise ValueError("TrainConfig: set max_steps (optimizer steps) or epochs")
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("TrainConfig: set only one of max_steps and epochs, not both")
        if self.max_steps is not None:
            _positive_int(self, "max_steps", "the number of optimizer steps")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise ValueError(f"TrainConfig.epochs must be a finite number > 0, got "
                             f"{self.epochs!r}")
        if not 0 < self.lr < math.inf:
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr!r}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"TrainConfig.momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("TrainConfig.min_lr_ratio (the floor of the decay, as a fraction "
                             f"of lr) must be in [0, 1], got {self.min_lr_ratio!r}")
        _betas(self.betas)
        if not 0 < self.collective_timeout_s < math.inf:
            raise ValueError("TrainConfig.collective_timeout_s must be a finite number of "
                             f"seconds > 0, got {self.collective_timeout_s!r}")
        for name in ("seed", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        if self.pad_token_id is not None and (
                isinstance(self.pad_token_id, bool) or not isinstance(self.pad_token_id, int)
                or self.pad_token_id < 0):
            raise ValueError(f"TrainConfig.pad_token_id must be an integer >= 0 or None, got "
                             f"{self.pad_token_id!r}")
        _choice(self, "optimizer", OPTIMIZERS)
        _choice(self, "schedule", SCHEDULES)
        _choice(self, "precision", PRECISIONS)
        _choice(self, "loss_normalization", NORMALIZATIONS)
        _choice(self, "partial_window", PARTIAL_WINDOW_POLICIES)
        _choice(self, "device", DEVICES)
        _choice(self, "task", ("auto",) + TASKS)
        _choice(self, "eval_metric", EVAL_METRICS)
        _choice(self, "parallel", PARALLEL)
        _check_fsdp(self)
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ValueError(
                f"TrainConfig.clip_grad_norm must be > 0 or None (off), got {self.clip_grad_norm}"
            )
        if self.eval_every is not None and self.eval_every != "epoch":
            _positive_int(self, "eval_every", "optimizer steps between evaluations, or 'epoch'")
        for name in ("checkpoint_every", "early_stopping_patience", "eval_batch_size",
                     "keep_last"):
            if getattr(self, name) is not None:
                _positive_int(self, name, "or None to turn it off")
        if self.checkpoint_every is not None and self.checkpoint_dir is None:
            raise ValueError("TrainConfig.checkpoint_every needs checkpoint_dir (where to write)")
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("TrainConfig.early_stopping_patience needs eval_every and eval data")
        _choice(self, "lr_scaling", LR_SCALINGS)
        if self.lr_scaling != "none" and self.base_batch is None:
            raise ValueError("TrainConfig.lr_scaling needs base_batch: the effective batch (in "
                             "sequences) at which lr was tuned")
        if self.base_batch is not None:
            _positive_int(self, "base_batch", "sequences per step at which lr was tuned")
        for name in ("batch_ramp_tokens", "seq_len_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 0 (0 = off), "
                                 f"got {value!r}")
        if self.batch_ramp_tokens and self.max_steps is None:
            raise ValueError("TrainConfig.batch_ramp_tokens needs max_steps: with a growing "
                             "window the number of steps per epoch is not fixed")
        _positive_int(self, "seq_len_start", "tokens per sequence at the start of the warmup")
        if self.micro_batch_tokens is not None:
            _positive_int(self, "micro_batch_tokens", "padded tokens per micro-batch, or None")
        if self.loss_chunk_size is not None:
            _positive_int(self, "loss_chunk_size", "positions per loss chunk, or None")
        self.betas = tuple(self.betas)

    def to_dict(self) -> dict:
        """Plain JSON-ready dict of all fields."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """Build from a dict, naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str) -> TrainConfig:
        """Read the fields from a TOML file (a `[train]` table or top-level keys)."""
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls.from_dict(data.get("train", data))


def _number(cfg: TrainConfig, name: str) -> None:
    """Numbers must be numbers: a string such as "3e-4" names the field instead of failing later."""
    value = getattr(cfg, name)
    if value is None and name in ("clip_grad_norm", "epochs"):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = f" (write {name}={value} without quotes)" if isinstance(value, str) else ""
        raise ValueError(f"TrainConfig.{name} must be a number, got {value!r}{hint}")
    if math.isnan(value):
        raise ValueError(f"TrainConfig.{name} must be a number, got nan")


def _check_fsdp(cfg: TrainConfig) -> None:
    if cfg.sync_every_micro_batch and cfg.parallel != "fsdp":
        raise ValueError("TrainConfig.sync_every_micro_batch applies to parallel='fsdp' (DDP "
                         "always syncs once per window): set parallel='fsdp' or leave it False")
    if cfg.parallel != "fsdp":
        return
    if cfg.precision == "fp16":
        raise ValueError("parallel='fsdp' runs fp64, fp32 or bf16 (bf16 through FSDP's "
                         "MixedPrecisionPolicy, gradients reduced in float32); fp16 would need "
                         "a sharded GradScaler: use precision='bf16'")
    for name, why in (("compile", "torch.compile of a sharded model is not wired up here"),
                      ("noise_scale", "between micro-batches the sharded gradient is not in "
                                      ".grad")):
        if getattr(cfg, name):
            raise ValueError(f"parallel='fsdp' does not support {name}=True ({why}): turn it off")


def _betas(betas) -> None:
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    if not ok:
        raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1) (AdamW's moment "
                         f"decays, e.g. (0.9, 0.999)), got {betas!r}")


def _positive_int(cfg: TrainConfig, name: str, meaning: str) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TrainConfig.{name} must be an integer >= 1 ({meaning}), got {value!r}")


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {list(choices)}, got {value!r}")
