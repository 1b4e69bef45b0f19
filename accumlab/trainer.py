"""`accumlab.train`: the whole training loop, readable top to bottom.

    for epoch ...:
        for window in engine.windows(micro_batches):        # k micro-batches, N items
            for batch in window:                            # no_sync for the first k-1
                with autocast: logits = model(**inputs).logits
                window.backward(window.loss(logits, labels)) # sum of item losses / N
            record = window.step()                          # clip, step, schedule: once
            log, evaluate, checkpoint
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed
from .batching import epoch_order, micro_batch_groups, micro_batches, windows_per_epoch
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .collate import pad_collate
from .config import RESUME_FIELDS, TrainConfig
from .evaluation import evaluate
from .losses import IGNORE_INDEX, detect_task
from .metrics import HIGHER_IS_BETTER
from .noise import NoiseScale
from .precision import Precision, resolve_device
from .schedules import make_scheduler, ramp_accum_steps, scaled_lr, warmup_seq_len
from .window import Accumulator


class StopTraining(Exception):
    """Raise from a callback to end training cleanly after the current step."""


class OutOfMemoryError(torch.OutOfMemoryError):
    """A micro-batch did not fit in GPU memory; the message suggests a smaller split.

    A subclass of torch's own, so `except torch.OutOfMemoryError` (and
    `planner.find_largest_micro_batch`) catch it too.
    """


@dataclass
class TrainResult:
    """What a run produced: one history record per optimizer step, and eval metrics."""

    model: torch.nn.Module
    history: list[dict]
    eval_metrics: dict | None
    best_metrics: dict | None
    best_step: int | None
    steps: int
    stopped_early: bool
    config: TrainConfig
    evals: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        """The logged loss L_W of every optimizer step."""
        return [r["loss"] for r in self.history]


def train(
    model: torch.nn.Module,
    train_data: Sequence,
    config: TrainConfig,
    eval_data: Sequence | None = None,
    callbacks: Sequence = (),
    collate: Callable[[list[dict]], dict] | None = None,
) -> TrainResult:
    """Train `model` on `train_data` with exact gradient accumulation; see TrainConfig.

    `train_data` is a map-style dataset or list of dicts with `input_ids`, optional
    `attention_mask`, and `labels` (token ids for language modelling with -100 to ignore, or an
    int class). Micro-batches are padded dynamically to their own longest sequence; rows made
    by `accumlab.packing.pack_documents` (they carry `position_ids`) are collated with a
    per-document attention mask. `collate(examples) -> batch` replaces either.
    """
    cfg = config
    _check_data(train_data, cfg)
    distributed.init_from_env()  # under torchrun: join the process group
    if cfg.micro_batch_tokens and distributed.world_size() > 1:
        raise ValueError("micro_batch_tokens (token-budget batching) gives ranks different "
                         "numbers of micro-batches, which DDP cannot step together: use a "
                         "fixed micro_batch_size, or pack the documents (accumlab.packing)")
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device)
    precision.apply_matmul_settings()
    task = detect_task(model) if cfg.task == "auto" else cfg.task
    pad_id = _pad_token_id(model, cfg)
    main = distributed.is_main_process()

    model.to(device=device, dtype=precision.param_dtype)
    model.train()
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model)
    torch.manual_seed(cfg.seed)  # dropout masks
    net = _wrap_for_training(model, device, cfg)
    ranks = distributed.world_size()
    effective = cfg.micro_batch_size * cfg.accum_steps * ranks
    lr = scaled_lr(cfg.lr, effective, cfg.base_batch or effective, cfg.lr_scaling)
    optimizer = _make_optimizer(model, cfg, device, lr)
    collate = collate or _default_collate(train_data, pad_id, precision)

    def epoch_groups(epoch: int) -> list[list[int]]:  # example indices of each micro-batch
        order = epoch_order(len(train_data), epoch, shuffle=cfg.shuffle, seed=cfg.seed)
        return micro_batch_groups(train_data, order, cfg.micro_batch_size,
                                  max_tokens=cfg.micro_batch_tokens, shuffle=cfg.shuffle,
                                  seed=cfg.seed * 1_000_003 + epoch)

    micro_per_epoch = len(epoch_groups(0))
    per_epoch = windows_per_epoch(micro_per_epoch, 1, cfg.accum_steps, cfg.partial_window)
    if per_epoch == 0:
        raise ValueError(
            f"{len(train_data)} examples make fewer than accum_steps={cfg.accum_steps} "
            "micro-batches and partial_window='drop' drops them all: lower accum_steps or "
            "use partial_window='step'"
        )
    total_steps = cfg.max_steps or math.ceil(cfg.epochs * per_epoch)
    scheduler = make_scheduler(optimizer, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    scaler = precision.grad_scaler()
    engine = Accumulator(net, optimizer, cfg.accum_steps, task=task,
                         normalization=cfg.loss_normalization, scheduler=scheduler, scaler=scaler,
                         clip_grad_norm=cfg.clip_grad_norm, partial_window=cfg.partial_window,
                         loss_chunk_size=cfg.loss_chunk_size, noise_scale=cfg.noise_scale)
    noise = NoiseScale() if cfg.noise_scale else None
    callbacks = [_as_callback(c) for c in callbacks]

    step, epoch, micro_done, tokens_seen = 0, 0, 0, 0
    history: list[dict] = []
    tracker = _EvalTracker(cfg)
    if cfg.resume_from:
        saved = _resume(cfg, model, optimizer, scheduler, scaler)
        step, epoch, history = saved["step"], saved["epoch"], saved["history"]
        micro_done = saved.get("micro_done", saved["windows_done"] * cfg.accum_steps)
        tokens_seen, tracker.state = saved.get("tokens_seen", 0), saved["eval_state"]
        if noise is not None and saved.get("noise_state"):
            noise.load_state_dict(saved["noise_state"])

    mean_len = _mean_length(train_data)
    full_len = max(len(x["input_ids"]) for x in train_data) if cfg.seq_len_warmup_steps else 0
    if main and cfg.progress:
        scaling = "" if cfg.lr_scaling == "none" else (
            f"; lr {cfg.lr:g} at batch {cfg.base_batch} -> {lr:g} ({cfg.lr_scaling} scaling)")
        print(f"accumlab: {task} on {device} ({cfg.precision}); effective batch = "
              f"{cfg.micro_batch_size} micro x {cfg.accum_steps} steps x {ranks} rank(s) = "
              f"{effective} sequences ~ {effective * mean_len:,.0f} tokens "
              f"(mean length {mean_len:.1f}); {total_steps} optimizer steps{scaling}")

    def next_window_size() -> int:  # read when a window starts, after the previous step
        return ramp_accum_steps(tokens_seen, cfg.accum_steps, cfg.batch_ramp_tokens)

    def current_seq_len() -> int | None:
        if not cfg.seq_len_warmup_steps:
            return None
        return warmup_seq_len(step, full_len, cfg.seq_len_start, cfg.seq_len_warmup_steps)

    _notify(callbacks, "on_train_begin", {"total_steps": total_steps, "task": task,
                                          "effective_batch": effective, "config": cfg,
                                          "model": net, "optimizer": optimizer})
    bar = _progress_bar(cfg, main, total_steps, step)
    stopped_early = False
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    try:
        while step < total_steps and (cfg.epochs is None or epoch < math.ceil(cfg.epochs)):
            groups = epoch_groups(epoch)
            micro_per_epoch = len(groups)
            batches = micro_batches(train_data, [], cfg.micro_batch_size, pad_token_id=pad_id,
                                    groups=groups, collate=collate, skip=micro_done,
                                    seq_len=current_seq_len)
            steps_before, micro_before = step, micro_done
            for window in engine.windows(batches, sizes=next_window_size):
                t0 = time.perf_counter()
                tokens = sum(_real_tokens(b, pad_id) for b in window.micro_batches)
                on_device = [_to_device(b, device) for b in window.micro_batches]  # copies queued
                with _explain_oom(cfg, step):
                    for i, batch in enumerate(window):
                        with precision.autocast():
                            logits = net(**on_device[i]).logits
                        window.backward(window.loss(logits, batch["labels"]))
                    record = _guarded_step(window, step)
                micro_done += len(window)
                tokens_seen += tokens * ranks
                epoch_end = micro_done >= micro_per_epoch or (
                    cfg.partial_window == "drop"
                    and micro_per_epoch - micro_done < next_window_size())
                if not record.stepped and record.skipped_reason == "no labelled items":
                    continue
                elapsed = time.perf_counter() - t0
                step += 1 if record.stepped else 0
                entry = {
                    "step": step, "epoch": epoch, "loss": record.loss, "lr": record.lr,
                    "grad_norm": record.grad_norm, "items": record.items,
                    "micro_batches": record.micro_batches, "tokens": tokens,
                    "seq_len": int(window.micro_batches[0]["input_ids"].shape[1]),
                    "tokens_per_s": tokens * ranks / elapsed if elapsed > 0 else float("nan"),
                    "peak_memory_mb": _peak_memory_mb(device), "time_s": elapsed,
                    "skipped": not record.stepped,
                }
                if not record.stepped:
                    entry["skipped_reason"] = record.skipped_reason
                if noise is not None:
                    entry.update(_noise_entry(noise, record))
                history.append(entry)
                if eval_data is not None and _eval_due(cfg.eval_every, step, epoch_end):
                    metrics = _evaluate(net, eval_data, task, cfg, device, precision, pad_id)
                    entry["eval"] = metrics
                    improved = tracker.update(step, metrics)
                    _notify(callbacks, "on_evaluate", metrics)
                    if improved and cfg.checkpoint_dir and main:
                        _save(cfg, "best", model, optimizer, scheduler, scaler, step, epoch,
                              (micro_done, tokens_seen, noise), history, tracker, latest=False)
                _log(cfg, main, entry, bar)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and main:
                    _save(cfg, f"step-{step:08d}", model, optimizer, scheduler, scaler, step,
                          epoch, (micro_done, tokens_seen, noise), history, tracker)
                _notify(callbacks, "on_step_end", entry)
                if tracker.should_stop():
                    stopped_early = True
                    break
                if step >= total_steps:
                    break
            else:
                if micro_done > micro_before and step == steps_before:
                    raise ValueError(
                        f"epoch {epoch} made no optimizer step: every window had all labels "
                        "masked (-100). Check the labels in train_data."
                    )
                epoch, micro_done = epoch + 1, 0
                continue
            break
    except StopTraining:
        stopped_early = True
    finally:
        if bar is not None:
            bar.close()

    final = None
    if eval_data is not None:
        final = _evaluate(net, eval_data, task, cfg, device, precision, pad_id)
        if not tracker.evals or tracker.evals[-1]["step"] != step:
            tracker.update(step, final)
    result = TrainResult(model, history, final, tracker.best_metrics, tracker.best_step, step,
                         stopped_early, cfg, tracker.evals)
    _notify(callbacks, "on_train_end", result)
    return result


# ---------------------------------------------------------------- helpers of the loop


def _check_data(data: Sequence, cfg: TrainConfig) -> None:
    try:
        n = len(data)
    except TypeError as e:
        raise TypeError("train_data must be a map-style dataset or a list of dicts") from e
    if n == 0:
        raise ValueError("train_data is empty: pass at least micro_batch_size examples")
    if n < cfg.micro_batch_size:
        raise ValueError(
            f"train_data has {n} examples, fewer than one micro-batch "
            f"(micro_batch_size={cfg.micro_batch_size}): lower micro_batch_size to at most {n} "
            "or add data"
        )
    first = data[0]
    if not isinstance(first, dict) or "input_ids" not in first or "labels" not in first:
        raise ValueError("each training example must be a dict with 'input_ids' and 'labels'")


def _pad_token_id(model: torch.nn.Module, cfg: TrainConfig) -> int:
    if cfg.pad_token_id is not None:
        return cfg.pad_token_id
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return pad if pad is not None else 0


def _wrap_for_training(model: torch.nn.Module, device: torch.device, cfg: TrainConfig):
    net = model
    if distributed.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index or torch.cuda.current_device()] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)
    return net


def _default_collate(data: Sequence, pad_id: int, precision: Precision):
    if "position_ids" not in data[0]:
        return lambda examples: pad_collate(examples, pad_id)
    from .packing import packed_collate

    # sdpa needs the additive mask in the dtype of the queries' parameters (fp32 or fp64)
    return lambda rows: packed_collate(rows, pad_id, mask_dtype=precision.param_dtype)


def _real_tokens(batch: dict, pad_id: int) -> int:
    """Tokens that are not padding (packed rows carry a 4-D mask: count non-pad ids)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int((batch["input_ids"] != pad_id).sum())


def _enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    # transformers 5 renamed gradient_checkpointing_enable (kept as a deprecated alias)
    new = getattr(model, "activation_checkpointing_enable", None)
    old = getattr(model, "gradient_checkpointing_enable", None)
    if (new or old) is None or not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"{type(model).__name__} has no gradient_checkpointing_enable(): turn "
                         "TrainConfig.gradient_checkpointing off or wrap its blocks in "
                         "torch.utils.checkpoint yourself")
    if getattr(getattr(model, "config", None), "use_cache", None):
        model.config.use_cache = False  # a KV cache is useless in training and clashes with it
    if new is not None:
        new(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        old(gradient_checkpointing_kwargs={"use_reentrant": False})


def _to_device(batch: dict, device: torch.device) -> dict:
    """The model inputs of a micro-batch on `device`; on CUDA copied from pinned memory without
    blocking, so that a window's copies overlap the compute already queued."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if device.type != "cuda":
        return {k: v.to(device) for k, v in inputs.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in inputs.items()}


def _noise_entry(noise, record) -> dict:
    extra = record.extra
    if not extra or not all(math.isfinite(extra[k]) for k in ("small_sq", "big_sq")):
        out = noise.state()
    else:
        out = noise.update(small_sq=extra["small_sq"], small_items=extra["small_items"],
                           big_sq=extra["big_sq"], big_items=extra["big_items"])
    return {"noise_scale": out["noise_scale"], "noise_grad_sq": out["grad_sq"],
            "noise_trace": out["trace_sigma"]}


def _make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device, lr: float):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, fused=fused or None)


def _guarded_step(window, step: int):
    try:
        return window.step()
    except FloatingPointError as e:
        raise FloatingPointError(f"optimizer step {step + 1}: {e}") from None


@contextlib.contextmanager
def _explain_oom(cfg: TrainConfig, step: int):
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise OutOfMemoryError(suggest_split(cfg.micro_batch_size, cfg.accum_steps, step)) from e


def suggest_split(micro_batch_size: int, accum_steps: int, step: int = 0) -> str:
    """Message for an out-of-memory micro-batch: the same effective batch, split finer."""
    where = f"at optimizer step {step + 1}: " if step else ""
    if micro_batch_size > 1:
        micro = micro_batch_size // 2
        k = -(-micro_batch_size * accum_steps // micro)
        return (f"out of GPU memory {where}micro_batch_size={micro_batch_size} x "
                f"accum_steps={accum_steps} does not fit. Keep the effective batch and split "
                f"it finer: micro_batch_size={micro}, accum_steps={k}")
    return (f"out of GPU memory {where}even micro_batch_size=1 does not fit: shorten the "
            "sequences, use precision='bf16', or enable activation checkpointing")


def _eval_due(every, step: int, epoch_end: bool) -> bool:
    if every == "epoch":
        return epoch_end
    return bool(every) and step % every == 0


def _evaluate(net, data, task, cfg, device, precision, pad_id) -> dict:
    with precision.autocast():
        return evaluate(net, data, task=task, batch_size=cfg.eval_batch_size or
                        cfg.micro_batch_size, device=device, pad_token_id=pad_id,
                        collate=_default_collate(data, pad_id, precision),
                        loss_chunk_size=cfg.loss_chunk_size)


class _EvalTracker:
    """Best metric so far and evaluations without improvement (for early stopping)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.state = {"best": None, "best_step": None, "bad_evals": 0, "evals": [],
                      "best_metrics": None}

    @property
    def evals(self) -> list[dict]:
        return self.state["evals"]

    @property
    def best_metrics(self):
        return self.state["best_metrics"]

    @property
    def best_step(self):
        return self.state["best_step"]

    def update(self, step: int, metrics: dict) -> bool:
        self.state["evals"].append({"step": step, **metrics})
        value = metrics.get(self.cfg.eval_metric)
        if value is None:
            raise ValueError(f"eval_metric={self.cfg.eval_metric!r} is not among the metrics "
                             f"{sorted(metrics)} of this task: choose one of those")
        best = self.state["best"]
        higher = HIGHER_IS_BETTER[self.cfg.eval_metric]
        if best is None or (value > best if higher else value < best):
            self.state.update(best=value, best_step=step, bad_evals=0, best_metrics=metrics)
            return True
        self.state["bad_evals"] += 1
        return False

    def should_stop(self) -> bool:
        patience = self.cfg.early_stopping_patience
        return patience is not None and self.state["bad_evals"] >= patience


def _resume_fields(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in RESUME_FIELDS}


def _save(cfg, name, model, optimizer, scheduler, scaler, step, epoch, position, history,
          tracker, latest: bool = True) -> Path:
    micro_done, tokens_seen, noise = position
    state = {"step": step, "epoch": epoch, "micro_done": micro_done, "tokens_seen": tokens_seen,
             "windows_done": micro_done // cfg.accum_steps,
             "noise_state": noise.state_dict() if noise is not None else None,
             "config": cfg.to_dict(), "history": history, "eval_state": tracker.state}
    return save_checkpoint(cfg.checkpoint_dir, name, model=model, optimizer=optimizer,
                           scheduler=scheduler, scaler=scaler, state=state, update_latest=latest)


def _resume(cfg, model, optimizer, scheduler, scaler) -> dict:
    path = cfg.resume_from
    if path == "latest":
        if not cfg.checkpoint_dir:
            raise ValueError("resume_from='latest' needs checkpoint_dir")
        found = latest_checkpoint(cfg.checkpoint_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {cfg.checkpoint_dir} to resume from")
        path = found
    return load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler,
                           scaler=scaler, expected=_resume_fields(cfg))


def _mean_length(data: Sequence, sample: int = 256) -> float:
    n = min(len(data), sample)
    return sum(len(data[i]["input_ids"]) for i in range(n)) / n


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _progress_bar(cfg: TrainConfig, main: bool, total: int, initial: int):
    if not (cfg.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _log(cfg: TrainConfig, main: bool, entry: dict, bar) -> None:
    if not main:
        return
    if bar is not None:
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                        tok_s=f"{entry['tokens_per_s']:,.0f}", refresh=False)
        bar.update(0 if entry["skipped"] else 1)
    if cfg.run_dir:
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(Path(cfg.run_dir) / "history.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")


class _FunctionCallback:
    def __init__(self, fn: Callable[[dict], object]):
        self.on_step_end = fn


def _as_callback(c):
    return _FunctionCallback(c) if callable(c) and not hasattr(c, "on_step_end") else c


def _notify(callbacks, event: str, payload) -> None:
    for c in callbacks:
        handler = getattr(c, event, None)
        if handler is not None:
            handler(payload)


__all__ = ["train", "TrainResult", "StopTraining", "OutOfMemoryError", "IGNORE_INDEX"]
