"""What `train` records around its loop: evaluation and early stopping, checkpoints to save and
resume, the progress bar, the JSON Lines log, callbacks and the noise-scale record."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from accumlab.engine.checkpoint import (
    CheckpointError,
    CheckpointWarning,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from accumlab.engine.config import RESUME_FIELDS, TrainConfig
from accumlab.engine.distributed import is_main_process
from accumlab.engine.evaluation import evaluate
from accumlab.engine.metrics import HIGHER_IS_BETTER
from accumlab.engine.setup import default_collate
from accumlab.engine.sharded_checkpoint import (
    is_sharded_checkpoint,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)


def noise_entry(noise, record) -> dict:
    extra = record.extra
    if not extra or not all(math.isfinite(extra[k]) for k in ("small_sq", "big_sq")):
        out = noise.state()
    else:
        out = noise.update(small_sq=extra["small_sq"], small_items=extra["small_items"],
                           big_sq=extra["big_sq"], big_items=extra["big_items"])
    return {"noise_scale": out["noise_scale"], "noise_grad_sq": out["grad_sq"],
            "noise_trace": out["trace_sigma"]}


def eval_due(every, step: int, epoch_end: bool) -> bool:
    if every == "epoch":
        return epoch_end
    return bool(every) and step % every == 0


def evaluate_model(net, data, task, cfg, device, precision, pad_id) -> dict:
    with precision.autocast():
        return evaluate(net, data, task=task, batch_size=cfg.eval_batch_size or
                        cfg.micro_batch_size, device=device, pad_token_id=pad_id,
                        collate=default_collate(data, pad_id, precision),
                        loss_chunk_size=cfg.loss_chunk_size)


class EvalTracker:
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


def resume_fields(cfg: TrainConfig) -> dict:
    return {k: getattr(cfg, k) for k in RESUME_FIELDS}


def save_run(cfg, name, model, optimizer, scheduler, scaler, step, epoch, position, log,
             tracker, data: dict | None = None, latest: bool = True) -> Path:
    """Checkpoint the run; its history stays in the run log (`log`), named by length and
    checksum, so that state.json does not grow with every step."""
    micro_done, tokens_seen, noise = position
    sharded = cfg.parallel == "fsdp"  # every rank writes its shards, and checks them
    if not sharded:
        check_finite_weights(model, step)
    log.sync()
    eval_state = {k: v for k, v in tracker.state.items() if k != "evals"}  # in the history
    state = {"step": step, "epoch": epoch, "micro_done": micro_done, "tokens_seen": tokens_seen,
             "windows_done": micro_done // cfg.accum_steps,
             "noise_state": noise.state_dict() if noise is not None else None,
             "config": cfg.to_dict(), "history": log.position(), "eval_state": eval_state,
             "data": data}
    save = save_sharded_checkpoint if sharded else save_checkpoint
    path = save(cfg.checkpoint_dir, name, model=model, optimizer=optimizer, scheduler=scheduler,
                scaler=scaler, state=state, update_latest=latest, link=not latest)
    if latest and is_main_process():
        prune_checkpoints(cfg.checkpoint_dir, cfg.keep_last)
    return path


class HistoryLog:
    """The run's history, one JSON line per record in `checkpoint_dir/history.jsonl`.

    A checkpoint stores how many lines it covers and their sha256; resuming reads them back
    (the same numbers, exactly) and cuts the log there, dropping steps made after it.
    """

    NAME = "history.jsonl"

    def __init__(self, directory: str | None, write: bool):
        self.path = Path(directory) / self.NAME if directory else None
        self.write = write and self.path is not None
        self.lines = 0
        self.hash = hashlib.sha256()
        self._file = None

    def start(self, history: list[dict]) -> None:
        """Begin the log with `history` (empty for a new run), replacing what was there."""
        for entry in history:
            self._count(_line(entry))
        if self.write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".tmp-{self.NAME}")
            tmp.write_text("".join(_line(e) for e in history))
            os.replace(tmp, self.path)
            self._file = open(self.path, "a")

    def append(self, entry: dict) -> None:
        line = _line(entry)
        self._count(line)
        if self._file is not None:
            self._file.write(line)

    def sync(self) -> None:
        """Make the lines a checkpoint will name durable before the checkpoint is written."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def position(self) -> dict:
        return {"entries": self.lines, "sha256": self.hash.hexdigest()}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _count(self, line: str) -> None:
        self.lines += 1
        self.hash.update(line.encode())


def _line(entry: dict) -> str:
    return json.dumps(entry, default=str) + "\n"


def read_history(checkpoint: Path, position: dict | None) -> list[dict]:
    """The history a checkpoint names, read back from the run log beside it."""
    if not position or not position.get("entries"):
        return []
    log = Path(checkpoint).parent / HistoryLog.NAME
    lines = []
    if log.exists():
        with open(log) as f:
            lines = [line for _, line in zip(range(position["entries"]), f)]
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    if len(lines) != position["entries"] or digest != position["sha256"]:
        warnings.warn(f"{log} does not hold the {position['entries']} history records that "
                      f"{Path(checkpoint).name} names (missing, cut or edited): training resumes "
                      "exactly, but the result's history starts empty", CheckpointWarning,
                      stacklevel=3)
        return []
    return [json.loads(line) for line in lines]


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Refuse to checkpoint weights that hold inf or nan (they would become `latest`)."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(
            f"after optimizer step {step} the weights hold inf or nan ({', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}), so no checkpoint was written and `latest` still "
            "names the last good one. Lower the learning rate or turn on clip_grad_norm."
        )


def resume_run(cfg, model, optimizer, scheduler, scaler, data: dict | None = None) -> dict:
    """Load the checkpoint `cfg.resume_from` names; its "history" is read back from the log."""
    path = cfg.resume_from
    if path == "latest":
        if not cfg.checkpoint_dir:
            raise ValueError("resume_from='latest' needs checkpoint_dir")
        found = latest_checkpoint(cfg.checkpoint_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {cfg.checkpoint_dir} to resume from")
        path = found
    load = load_checkpoint
    if cfg.parallel == "fsdp" or is_sharded_checkpoint(path):  # says what to do on a mismatch
        load = load_sharded_checkpoint if cfg.parallel == "fsdp" else _sharded_needs_fsdp
    state = load(path, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                 expected=resume_fields(cfg), data=data)
    history = read_history(Path(path), state.get("history"))
    state["history"] = history
    state["eval_state"]["evals"] = [{"step": e["step"], **e["eval"]} for e in history
                                    if "eval" in e]
    return state


def _sharded_needs_fsdp(path, **_) -> dict:
    raise CheckpointError(
        f"{path} is a sharded checkpoint of an FSDP run: resume it with parallel='fsdp' on as "
        "many ranks as wrote it, or start from its weights with "
        "accumlab.engine.sharded_checkpoint.load_consolidated")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def progress_bar(cfg: TrainConfig, main: bool, total: int, initial: int):
    if not (cfg.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def log_entry(cfg: TrainConfig, main: bool, entry: dict, bar) -> None:
    if not main:
        return
    if bar is not None:
        bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}",
                        tok_s=f"{entry['tokens_per_s']:,.0f}", refresh=False)
        bar.update(0 if entry["skipped"] else 1)
    if cfg.run_dir and not (cfg.checkpoint_dir and Path(cfg.run_dir).resolve()
                            == Path(cfg.checkpoint_dir).resolve()):  # else the run log has it
        os.makedirs(cfg.run_dir, exist_ok=True)
        with open(Path(cfg.run_dir) / "history.jsonl", "a") as f:
            f.write(_line(entry))


class FunctionCallback:
    def __init__(self, fn: Callable[[dict], object]):
        self.on_step_end = fn


def as_callback(c):
    """A function of the step record becomes an on_step_end hook; objects with hooks stay."""
    hooks = ("on_train_begin", "on_step_end", "on_evaluate", "on_train_end")
    return FunctionCallback(c) if callable(c) and not any(hasattr(c, h) for h in hooks) else c


def notify(callbacks, event: str, payload) -> None:
    for c in callbacks:
        handler = getattr(c, event, None)
        if handler is not None:
            handler(payload)
