"""Fine-tuning a classifier the seed article's way, done right: helpers for notebook 11.

    model = classifier("pretrained")            # data/pretrained/, or a hub id when online
    run = finetune(model, train, dev, test, micro_batch_size=32, accum_steps=2, epochs=3)
    run["dev_curve"], run["best"], run["test"]

`finetune` is `accumlab.train` with the seed's flow: AdamW, warmup then linear decay, clipping of
the accumulated gradient, evaluation on dev every epoch, early stopping, the best checkpoint
kept (by `metric`), and test metrics of that best checkpoint at the end.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from accumlab.data.paths import data_dir
from accumlab.engine.checkpoint import load_weights
from accumlab.engine.config import TrainConfig
from accumlab.engine.evaluation import evaluate
from accumlab.engine.trainer import train


def pretrained_dir() -> Path:
    """The shipped checkpoint made by `data/pretrain.py`: `data/pretrained/`."""
    return data_dir() / "pretrained"


def classifier(start: str = "pretrained", num_labels: int = 4, seed: int = 0,
               dropout: float | None = None) -> torch.nn.Module:
    """A sequence classifier: from a checkpoint, or randomly initialised with its architecture.

    `start` is "pretrained" (the shipped `data/pretrained/`), "random" (same architecture and
    size as the shipped checkpoint, fresh weights seeded by `seed`), or any folder or hub id
    for `from_pretrained`. The new classification head is initialised from `seed`. `dropout`
    overrides the checkpoint's dropout (0 in the shipped one).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = str(pretrained_dir()) if start in ("pretrained", "random") else start
    overrides = {"num_labels": num_labels}
    config = AutoConfig.from_pretrained(path, **overrides)
    if dropout is not None:
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop",
                     "embd_pdrop", "attn_pdrop"):
            if hasattr(config, name):
                setattr(config, name, dropout)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 1  # GPT-2 classifiers find the last token by the pad id
    torch.manual_seed(seed)
    if start == "random":
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    model.accumlab_task = "classification"
    return model


def finetune(
    model: torch.nn.Module, train_data: Sequence, dev_data: Sequence,
    test_data: Sequence | None = None, *, micro_batch_size: int = 32, accum_steps: int = 2,
    epochs: float = 3, lr: float = 1e-3, warmup_ratio: float = 0.1,
    clip_grad_norm: float | None = 1.0, weight_decay: float = 0.01, metric: str = "accuracy",
    patience: int | None = 2, checkpoint_dir: str | None = None, seed: int = 0,
    pad_token_id: int = 1, device: str = "cpu", progress: bool = False,
    callbacks: Sequence = (),
) -> dict:
    """Fine-tune with dev evaluation every epoch; returns curves and best/test metrics.

    The result holds `result` (the TrainResult), `losses` (train loss per optimizer step),
    `dev_curve` (one dict per epoch: epoch, step, loss, accuracy, f1), `best` (dev metrics of
    the best epoch by `metric`), `best_step`, `checkpoint` (the folder of the best weights) and
    `test` (metrics of the best weights on `test_data`, or None). The model ends holding the
    best weights. `callbacks` go to `accumlab.train` (e.g. a panel's progress line).
    """
    effective = micro_batch_size * accum_steps
    steps_per_epoch = math.ceil(len(train_data) / effective)
    total = math.ceil(epochs * steps_per_epoch)
    own_dir = None
    if checkpoint_dir is None:
        own_dir = tempfile.TemporaryDirectory(prefix="accumlab-finetune-")
        checkpoint_dir = own_dir.name
    cfg = TrainConfig(
        micro_batch_size=micro_batch_size, accum_steps=accum_steps, epochs=epochs, lr=lr,
        optimizer="adamw", weight_decay=weight_decay, schedule="linear",
        warmup_steps=round(warmup_ratio * total), clip_grad_norm=clip_grad_norm,
        eval_every="epoch", eval_metric=metric, early_stopping_patience=patience,
        checkpoint_dir=str(checkpoint_dir), seed=seed, device=device, progress=progress,
        pad_token_id=pad_token_id, task="classification",
    )
    try:
        result = train(model, train_data, cfg, eval_data=dev_data, callbacks=callbacks)
        best_dir = Path(checkpoint_dir) / "best"
        load_weights(best_dir, model)
        test = None
        if test_data is not None:
            test = evaluate(model, test_data, task="classification", batch_size=64,
                            pad_token_id=pad_token_id)
    finally:
        if own_dir is not None:
            own_dir.cleanup()
    epochs_of = {r["step"]: r["epoch"] + 1 for r in result.history}
    curve = [{"epoch": epochs_of.get(e["step"]), **e} for e in result.evals]
    return {
        "result": result, "losses": result.losses, "dev_curve": curve,
        "best": result.best_metrics, "best_step": result.best_step, "test": test,
        "checkpoint": None if own_dir is not None else str(best_dir),
        "stopped_early": result.stopped_early, "effective_batch": effective,
        "steps": result.steps,
    }


def seed_train_epoch(model, dataset, batch_size, optimizer, accumulate_steps, collate_fn=None,
                     device="cpu"):
    """The seed article's `train_epoch`, runnable and with its bugs kept (do not use).

    It never calls `loss.backward()`, so no gradient exists and `optimizer.step()` changes
    nothing; it also zeroes gradients every micro-batch, divides the loss by k only after the
    (missing) backward, and returns the loss of the last partial window over all batches.
    """
    from torch.utils.data import DataLoader

    dataloader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn)
    model.train()
    epoch_loss = 0
    epoch_num = 0
    for batch in dataloader:
        input_ids = batch["input_ids"].to(device)
        attention_mask = batch["attention_mask"].to(device)
        labels = batch["labels"].to(device)
        model.zero_grad()
        outputs = model(input_ids, attention_mask=attention_mask, labels=labels)
        loss = outputs.loss
        epoch_loss += loss.item()
        epoch_num += 1
        if epoch_num % accumulate_steps == 0:
            loss /= accumulate_steps
            optimizer.step()
            optimizer.zero_grad()
            epoch_loss = 0
            epoch_num = 0

    return epoch_loss / len(dataloader)
