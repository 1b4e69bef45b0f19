"""`accumlab.train`: the whole training loop, readable top to bottom.

    for epoch ...:
        for window in engine.windows(micro_batches):        # k micro-batches, N items
            for batch in window:                            # no_sync for the first k-1
                window.backward(micro_step(window, inputs, labels))
                # = autocast forward + sum of item losses / N (one compiled region if compile)
            record = window.step()                          # clip, step, schedule: once
            log, evaluate, checkpoint
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from accumlab.engine import distributed
from accumlab.engine.batching import (
    epoch_order,
    micro_batch_groups,
    micro_batches,
    windows_per_epoch,
)
from accumlab.engine.bookkeeping import (
    EvalTracker,
    HistoryLog,
    as_callback,
    eval_due,
    evaluate_model,
    log_entry,
    noise_entry,
    notify,
    peak_memory_mb,
    progress_bar,
    resume_run,
    save_run,
)
from accumlab.engine.checkpoint import remove_debris
from accumlab.engine.compiled import make_micro_step
from accumlab.engine.config import TrainConfig
from accumlab.engine.fsdp import check_launch
from accumlab.engine.losses import IGNORE_INDEX, detect_task
from accumlab.engine.noise import NoiseScale
from accumlab.engine.precision import Precision, resolve_device
from accumlab.engine.schedules import make_scheduler, ramp_accum_steps, scaled_lr, warmup_seq_len
from accumlab.engine.setup import (
    default_collate,
    enable_gradient_checkpointing,
    make_optimizer,
    mean_length,
    pad_token_id,
    real_tokens,
    wrap_for_training,
)
from accumlab.engine.validate import (
    check_callbacks,
    check_checkpoint_dir,
    check_dataset,
    check_inputs,
    check_run,
)
from accumlab.engine.window import Accumulator


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
    by `accumlab.data.packing.pack_documents` (they carry `position_ids`) are collated with a
    per-document attention mask. `collate(examples) -> batch` replaces either.
    """
    cfg = config
    check_dataset(train_data, "train_data", cfg.micro_batch_size)
    callbacks = [as_callback(c) for c in check_callbacks(callbacks)]
    distributed.init_from_env(timeout_s=cfg.collective_timeout_s)  # under torchrun
    check_launch(cfg)  # parallel="fsdp" needs torchrun ranks
    if cfg.micro_batch_tokens and distributed.world_size() > 1:
        raise ValueError("micro_batch_tokens (token-budget batching) gives ranks different "
                         "numbers of micro-batches, which DDP cannot step together: use a "
                         "fixed micro_batch_size, or pack the documents (accumlab.data.packing)")
    device = resolve_device(cfg.device)
    precision = Precision(cfg.precision, device)
    precision.apply_matmul_settings()
    task = detect_task(model) if cfg.task == "auto" else cfg.task
    pad_id = pad_token_id(model, cfg)
    fingerprint = check_inputs(model, cfg, train_data, eval_data, task, pad_id)
    try:
        distributed.check_same_data(len(train_data), fingerprint)
    except RuntimeError as e:
        distributed.explain_failure(e, "before the first step", cfg.collective_timeout_s)
        raise
    main = distributed.is_main_process()
    writes = main or cfg.parallel == "fsdp"  # sharded checkpoints: every rank writes its shards

    model.to(device=device, dtype=precision.param_dtype)
    model.train()
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(cfg.seed)  # dropout masks
    net = wrap_for_training(model, device, cfg)
    ranks = distributed.world_size()
    collate = collate or default_collate(train_data, pad_id, precision)
    micro_step = make_micro_step(model, net, task, cfg, precision, pad_id=pad_id, data=train_data)

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
    used_k = check_run(cfg, total_steps, micro_per_epoch, ranks)  # < accum_steps: warned
    effective = cfg.micro_batch_size * used_k * ranks
    lr = scaled_lr(cfg.lr, effective, cfg.base_batch or effective, cfg.lr_scaling)
    optimizer = make_optimizer(model, cfg, device, lr)
    scheduler = make_scheduler(optimizer, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    scaler = precision.grad_scaler()
    engine = Accumulator(net, optimizer, cfg.accum_steps, task=task,
                         normalization=cfg.loss_normalization, scheduler=scheduler, scaler=scaler,
                         clip_grad_norm=cfg.clip_grad_norm, partial_window=cfg.partial_window,
                         loss_chunk_size=cfg.loss_chunk_size, noise_scale=cfg.noise_scale)
    noise = NoiseScale() if cfg.noise_scale else None

    step, epoch, micro_done, tokens_seen = 0, 0, 0, 0
    history: list[dict] = []
    tracker = EvalTracker(cfg)
    data_id = {"examples": len(train_data), "fingerprint": fingerprint}
    if cfg.checkpoint_dir and main:
        remove_debris(cfg.checkpoint_dir)  # folders a crash left half-written
        check_checkpoint_dir(cfg)
    if cfg.resume_from:
        saved = resume_run(cfg, model, optimizer, scheduler, scaler, data_id)
        step, epoch, history = saved["step"], saved["epoch"], saved["history"]
        micro_done = saved.get("micro_done", saved["windows_done"] * cfg.accum_steps)
        tokens_seen, tracker.state = saved.get("tokens_seen", 0), saved["eval_state"]
        if noise is not None and saved.get("noise_state"):
            noise.load_state_dict(saved["noise_state"])

    run_log = HistoryLog(cfg.checkpoint_dir, write=main)
    run_log.start(history)  # a resumed run's log is cut back to the checkpoint
    mean_len = mean_length(train_data)
    full_len = max(len(x["input_ids"]) for x in train_data) if cfg.seq_len_warmup_steps else 0
    if main and cfg.progress:
        scaling = "" if cfg.lr_scaling == "none" else (
            f"; lr {cfg.lr:g} at batch {cfg.base_batch} -> {lr:g} ({cfg.lr_scaling} scaling)")
        short = "" if used_k == cfg.accum_steps else f" (not accum_steps={cfg.accum_steps})"
        print(f"accumlab: {task} on {device} ({cfg.precision}); effective batch = "
              f"{cfg.micro_batch_size} micro x {used_k} steps{short} x {ranks} rank(s) = "
              f"{effective} sequences ~ {effective * mean_len:,.0f} tokens "
              f"(mean length {mean_len:.1f}); {total_steps} optimizer steps{scaling}")

    def next_window_size() -> int:  # read when a window starts, after the previous step
        return ramp_accum_steps(tokens_seen, cfg.accum_steps, cfg.batch_ramp_tokens)

    def current_seq_len() -> int | None:
        if not cfg.seq_len_warmup_steps:
            return None
        return warmup_seq_len(step, full_len, cfg.seq_len_start, cfg.seq_len_warmup_steps)

    notify(callbacks, "on_train_begin", {"total_steps": total_steps, "task": task,
                                          "effective_batch": effective, "config": cfg,
                                          "model": net, "optimizer": optimizer})
    bar = progress_bar(cfg, main, total_steps, step)
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
            logged_before, micro_before = len(history), micro_done
            for window in engine.windows(batches, sizes=next_window_size):
                t0 = time.perf_counter()
                tokens = sum(real_tokens(b, pad_id) for b in window.micro_batches)
                on_device = [micro_step.to_device(micro_step.prepare(b), device)
                             for b in window.micro_batches]  # copies queued
                with _explain_oom(cfg, step):
                    for i, batch in enumerate(window):  # autocast forward, loss / N
                        window.backward(micro_step(window, on_device[i], batch["labels"]))
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
                    "peak_memory_mb": peak_memory_mb(device), "time_s": elapsed,
                    "skipped": not record.stepped,
                }
                if not record.stepped:
                    entry["skipped_reason"] = record.skipped_reason
                if noise is not None:
                    entry.update(noise_entry(noise, record))
                history.append(entry)
                improved = False
                if eval_data is not None and eval_due(cfg.eval_every, step, epoch_end):
                    metrics = evaluate_model(net, eval_data, task, cfg, device, precision, pad_id)
                    entry["eval"] = metrics
                    improved = tracker.update(step, metrics)
                    notify(callbacks, "on_evaluate", metrics)
                run_log.append(entry)
                log_entry(cfg, main, entry, bar)
                where = (micro_done, tokens_seen, noise)
                if improved and cfg.checkpoint_dir and writes:
                    save_run(cfg, "best", model, optimizer, scheduler, scaler, step, epoch, where,
                             run_log, tracker, data_id, latest=False)
                if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and writes
                        and record.stepped):
                    save_run(cfg, f"step-{step:08d}", model, optimizer, scheduler, scaler, step,
                             epoch, where, run_log, tracker, data_id)
                notify(callbacks, "on_step_end", entry)
                if tracker.should_stop():
                    stopped_early = True
                    break
                if step >= total_steps:
                    break
            else:
                if micro_done > micro_before and len(history) == logged_before:
                    raise ValueError(
                        f"epoch {epoch} made no optimizer step: every window had all labels "
                        "masked (-100). Check the labels in train_data."
                    )
                epoch, micro_done = epoch + 1, 0
                continue
            break
    except StopTraining:
        stopped_early = True
    except RuntimeError as e:  # a collective timed out: name this rank and the step
        distributed.explain_failure(e, f"at optimizer step {step + 1}", cfg.collective_timeout_s)
        raise
    finally:
        run_log.close()
        if bar is not None:
            bar.close()

    final = None
    if eval_data is not None:
        final = evaluate_model(net, eval_data, task, cfg, device, precision, pad_id)
        if not tracker.evals or tracker.evals[-1]["step"] != step:
            tracker.update(step, final)
    result = TrainResult(model, history, final, tracker.best_metrics, tracker.best_step, step,
                         stopped_early, cfg, tracker.evals)
    notify(callbacks, "on_train_end", result)
    return result


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


__all__ = ["train", "TrainResult", "StopTraining", "OutOfMemoryError", "IGNORE_INDEX"]
