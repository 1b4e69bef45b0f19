"""Checks before the first step: datasets, every example, eval data, callbacks and the run.

A bad example must be named (index, field, limit) before training, not found 18 frames deep
in an embedding lookup or silently cut by the collator. The check reads every example once,
then tests the token ids and labels of the whole dataset as flat numpy arrays (numpy rather
than torch: building them from Python lists is several times faster, and it never competes for
torch's threads); it costs about as
much as collating one epoch and returns a fingerprint of the data (for resuming).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from accumlab.engine.checkpoint import step_checkpoints
from accumlab.engine.losses import IGNORE_INDEX

CHUNK = 8192  # examples checked together: bounded memory on a large dataset
HOOKS = ("on_train_begin", "on_step_end", "on_evaluate", "on_train_end")
TASK_METRICS = {"classification": ("loss", "accuracy", "f1"),
                "causal_lm": ("loss", "perplexity"), "masked_lm": ("loss", "perplexity")}


class ConfigWarning(UserWarning):
    """A setting that runs but is unlikely to be what was meant."""


@dataclass
class ModelLimits:
    """What a model accepts: token ids below `vocab`, `positions` positions, `num_labels`."""

    vocab: int | None
    positions: int | None
    num_labels: int | None


def model_limits(model: torch.nn.Module) -> ModelLimits:
    """Vocabulary (embedding rows), learned positions and classes of a transformers model."""
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None)
    get_emb = getattr(model, "get_input_embeddings", None)
    emb = get_emb() if callable(get_emb) else None
    if isinstance(emb, torch.nn.Embedding):
        vocab = emb.num_embeddings
    positions = None  # only learned position tables are a hard limit (rotary ones are not)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and name.rsplit(".", 1)[-1] in (
                "wpe", "position_embeddings"):
            positions = module.num_embeddings
    return ModelLimits(vocab, positions, getattr(config, "num_labels", None))


def check_inputs(model, cfg, train_data, eval_data, task: str, pad_id: int) -> str | None:
    """Everything `train` checks before its first step; returns train_data's fingerprint
    (None when `cfg.validate_data` is off: then only the containers and the pad id are checked).
    """
    limits = model_limits(model)
    check_pad_token(pad_id, limits, explicit=cfg.pad_token_id is not None)
    if eval_data is not None:
        check_eval_data(eval_data, limits, task, cfg.eval_metric, examples=cfg.validate_data)
    elif cfg.eval_every is not None:
        warnings.warn("eval_every is set but no eval_data was given: nothing will be evaluated",
                      ConfigWarning, stacklevel=3)
    return check_examples(train_data, limits, task) if cfg.validate_data else None


def check_dataset(data, name: str, micro_batch_size: int | None = None) -> int:
    """The dataset is a sized, indexable collection of examples; returns its length."""
    if isinstance(data, (str, bytes, os.PathLike)):
        raise TypeError(f"{name} is a path ({str(data)[:80]!r}): load the examples first "
                        "(a list of dicts or a map-style dataset)")
    if isinstance(data, Mapping):
        if "input_ids" in data:
            raise TypeError(f"{name} is one example (a dict): pass a list of examples")
        raise TypeError(f"{name} is a dict with keys {sorted(map(str, data))[:5]}: pass one "
                        "split (a list of examples), e.g. data['validation']")
    try:
        n = len(data)
        first = data[0] if n else None
    except (TypeError, KeyError) as e:
        raise TypeError(f"{name} must be a map-style dataset or a list of dicts (indexable, "
                        f"with len()), got {type(data).__name__}") from e
    if n == 0:
        raise ValueError(f"{name} is empty: pass at least one example"
                         + (f" (at least micro_batch_size={micro_batch_size})"
                            if micro_batch_size else ""))
    if micro_batch_size and n < micro_batch_size:
        raise ValueError(
            f"{name} has {n} examples, fewer than one micro-batch (micro_batch_size="
            f"{micro_batch_size}): lower micro_batch_size to at most {n} or add data")
    if not isinstance(first, Mapping) or "input_ids" not in first or "labels" not in first:
        raise ValueError(f"each {name} example must be a dict with 'input_ids' and 'labels'")
    return n


def check_examples(data: Sequence, limits: ModelLimits, task: str, name: str = "train_data",
                   need_scored: bool = False) -> str:
    """Check every example; raise naming the first bad one. Returns a fingerprint of the data.

    Reads CHUNK examples at a time, so memory stays bounded on a large dataset.
    `need_scored`: also raise when every label is -100 (nothing to score).
    """
    hashes = [hashlib.sha256() for _ in range(3)]  # lengths, ids, labels: chunking-independent
    scored = False
    for start in range(0, len(data), CHUNK):
        examples = [data[i] for i in range(start, min(start + CHUNK, len(data)))]
        try:
            scored |= _check_chunk(examples, limits, task, hashes)
        except _Bad as bad:
            raise ValueError(f"{name} example {start + bad.index}{bad.text}") from None
    if need_scored and not scored:
        raise ValueError(f"every label of {name} is -100: there is nothing to evaluate")
    return hashlib.sha256(b"".join(h.digest() for h in hashes)).hexdigest()[:16]


class _Bad(Exception):
    """Example `index` of a chunk is bad; `text` follows "<name> example <i>"."""

    def __init__(self, index: int, text: str):
        super().__init__(text)
        self.index, self.text = index, text


def _check_chunk(examples: list, limits: ModelLimits, task: str, hashes: list) -> bool:
    """Check a run of examples and add them to the fingerprint; True if any label is scored."""
    for i, ex in enumerate(examples):
        if not isinstance(ex, Mapping):
            raise _Bad(i, f" is a {type(ex).__name__}, not a dict with 'input_ids' and 'labels'")
        for key in ("input_ids", "labels"):
            if key not in ex:
                raise _Bad(i, f" has no {key!r} (its keys: {sorted(map(str, ex))}): every "
                              "example needs one")
    ids, lengths = _flatten([ex["input_ids"] for ex in examples], "input_ids")
    if (lengths == 0).any():
        raise _Bad(_first(lengths == 0), ": input_ids is empty")
    _check_range(ids, lengths, "input_ids", limits.vocab, "the vocabulary")
    _check_positions(examples, lengths, limits.positions)
    for i, ex in enumerate(examples):
        mask = ex.get("attention_mask")
        if mask is not None and len(mask) != int(lengths[i]):
            raise _Bad(i, f": attention_mask has {len(mask)} entries but input_ids has "
                          f"{int(lengths[i])}")
    if task == "classification":
        labels = _class_labels([ex["labels"] for ex in examples])
        classes = limits.num_labels
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= (classes or 2**62)))
        if bad.any():
            i = _first(bad)
            raise _Bad(i, f": labels = {int(labels[i])} is not a class of the model, which has "
                          f"num_labels={classes} (0 to {classes - 1}; -100 to ignore)")
        scored = labels != IGNORE_INDEX
    else:
        labels, label_lengths = _flatten([ex["labels"] for ex in examples], "labels")
        if not np.array_equal(label_lengths, lengths):
            i = _first(label_lengths != lengths)
            raise _Bad(i, f": labels has {int(label_lengths[i])} entries but input_ids has "
                          f"{int(lengths[i])}: they must line up token by token (-100 where "
                          "there is no loss)")
        _check_range(labels, lengths, "labels", limits.vocab, "the vocabulary",
                     allow=IGNORE_INDEX)
        scored = labels != IGNORE_INDEX
        if task == "causal_lm":  # the first token of each example predicts nothing
            scored[np.cumsum(lengths) - lengths] = False
    for h, a in zip(hashes, (lengths, ids, labels)):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return bool(scored.any())


def check_eval_data(data, limits: ModelLimits, task: str, eval_metric: str,
                    examples: bool = True) -> None:
    """eval_data: the metric, the right type, not empty, valid examples with labels to score."""
    if eval_metric not in TASK_METRICS[task]:
        raise ValueError(f"eval_metric={eval_metric!r} is not a metric of {task} (it has "
                         f"{list(TASK_METRICS[task])}): set TrainConfig.eval_metric to one")
    check_dataset(data, "eval_data")
    if examples:
        check_examples(data, limits, task, name="eval_data", need_scored=True)


def check_pad_token(pad_id: int, limits: ModelLimits, explicit: bool) -> None:
    """The padding id must be a token of the model (it goes through the embedding)."""
    source = "TrainConfig.pad_token_id" if explicit else "the model config's pad_token_id"
    if isinstance(pad_id, bool) or not isinstance(pad_id, int) or pad_id < 0 or (
            limits.vocab is not None and pad_id >= limits.vocab):
        raise ValueError(f"pad_token_id={pad_id!r} (from {source}) is outside the vocabulary "
                         f"[0, {limits.vocab}): set TrainConfig.pad_token_id to a token id of "
                         "the model, e.g. the tokenizer's pad_token_id")


def check_callbacks(callbacks) -> list:
    """Each callback is a function of the step record, or an object with hooks."""
    if callable(callbacks) or any(hasattr(callbacks, h) for h in HOOKS) or isinstance(
            callbacks, (str, Mapping)):
        raise TypeError("callbacks must be a list, e.g. callbacks=[my_callback]")
    out = list(callbacks)
    for i, c in enumerate(out):
        if isinstance(c, type):
            raise TypeError(f"callbacks[{i}] is the class {c.__name__}: pass an instance, "
                            f"{c.__name__}()")
        if not callable(c) and not any(hasattr(c, h) for h in HOOKS):
            raise TypeError(f"callbacks[{i}] is a {type(c).__name__}, which is neither callable "
                            f"nor has any of the hooks {list(HOOKS)}")
    return out


def check_run(cfg, total_steps: int, micro_per_epoch: int, ranks: int) -> int:
    """Warn about settings that run but mislead; returns the window size actually used."""
    if cfg.warmup_steps and cfg.warmup_steps >= total_steps:
        warnings.warn(f"warmup_steps={cfg.warmup_steps} is not below the run's {total_steps} "
                      "optimizer steps: the learning rate never reaches lr. Shorten the warmup "
                      "or train longer", ConfigWarning, stacklevel=3)
    used = cfg.accum_steps
    if cfg.partial_window == "step" and micro_per_epoch < cfg.accum_steps:
        used = micro_per_epoch
        per_rank = " per rank" if ranks > 1 else ""
        batch = "" if cfg.micro_batch_tokens else (
            f", so the effective batch is {cfg.micro_batch_size * used * ranks} sequences, not "
            f"{cfg.micro_batch_size * cfg.accum_steps * ranks}")
        warnings.warn(
            f"accum_steps={cfg.accum_steps} is larger than the {micro_per_epoch} micro-batches "
            f"of an epoch{per_rank}: every window holds only {micro_per_epoch}{batch}. Lower "
            "accum_steps or add data", ConfigWarning, stacklevel=3)
    return used


def check_checkpoint_dir(cfg) -> None:
    """Warn when a new run (not resuming) writes beside another run's step checkpoints."""
    if not cfg.checkpoint_dir or cfg.resume_from:
        return
    others = step_checkpoints(cfg.checkpoint_dir)
    if others:
        warnings.warn(f"checkpoint_dir {cfg.checkpoint_dir} already holds step checkpoints "
                      f"({others[-1].name} the newest): this new run writes beside them, and "
                      "keep_last counts them too. Use a new checkpoint_dir, or resume with "
                      "resume_from='latest'", ConfigWarning, stacklevel=3)


def _as_list(x) -> list:
    return x.tolist() if hasattr(x, "tolist") else list(x)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _array(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _flatten(seqs: list, field: str) -> tuple[np.ndarray, np.ndarray]:
    """All sequences as one flat int64 array, and their lengths; names the first bad one."""
    try:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        if all(type(s) is list for s in seqs):
            flat = np.array(list(chain.from_iterable(seqs)))  # the dtype tells floats apart
        else:
            parts = [_array(s) for s in seqs]
            flat = np.concatenate(parts) if all(p.ndim == 1 for p in parts) else None
        ok = (flat is not None and flat.ndim == 1 and flat.size == lengths.sum()
              and (flat.dtype.kind in "iu" or flat.size == 0))
    except (TypeError, ValueError, RuntimeError, OverflowError):
        ok = False
    if not ok:
        _raise_first_bad_sequence(seqs, field)
    return flat.astype(np.int64, copy=False), lengths


def _raise_first_bad_sequence(seqs: list, field: str) -> None:
    for i, s in enumerate(seqs):
        if isinstance(s, (str, bytes, Mapping)) or not hasattr(s, "__len__"):
            raise _Bad(i, f": {field} must be a list of integer token ids, got "
                          f"{type(s).__name__} {str(s)[:40]!r}")
        for j, v in enumerate(_as_list(s)):
            if isinstance(v, list):
                raise _Bad(i, f": {field} must be a flat list of token ids, but it holds a list "
                              f"at [{j}]: drop the batch dimension")
            if isinstance(v, bool) or not isinstance(v, int):
                raise _Bad(i, f": {field}[{j}] = {v!r} is not an integer: token ids must be "
                              "integers")
            if not -2**63 <= v < 2**63:
                raise _Bad(i, f": {field}[{j}] = {v} is not a token id")
    raise ValueError(f"{field} could not be read as integer token ids")


def _check_range(flat, lengths, field, limit, what, allow: int | None = None) -> None:
    bad = flat < 0
    if limit is not None:
        bad |= flat >= limit
    if allow is not None:
        bad &= flat != allow
    if bad.any():
        pos = _first(bad)
        ends = np.cumsum(lengths)
        i = int(np.searchsorted(ends, pos, side="right"))
        j = pos - int(ends[i] - lengths[i])
        allowed = f" (or {allow} to ignore)" if allow is not None else ""
        raise _Bad(i, f": {field}[{j}] = {int(flat[pos])} is outside {what} [0, {limit})"
                      f"{allowed} of the model")


def _check_positions(examples, lengths, limit) -> None:
    if limit is None:
        return
    if "position_ids" in examples[0]:  # packed rows: positions restart at each document
        pos, pos_lengths = _flatten([ex["position_ids"] for ex in examples], "position_ids")
        if not np.array_equal(pos_lengths, lengths):
            i = _first(pos_lengths != lengths)
            raise _Bad(i, f": position_ids has {int(pos_lengths[i])} entries but input_ids has "
                          f"{int(lengths[i])}")
        _check_range(pos, lengths, "position_ids", limit, "the positions")
        return
    too_long = lengths > limit
    if too_long.any():
        i = _first(too_long)
        raise _Bad(i, f": input_ids has {int(lengths[i])} tokens, more than the model's {limit} "
                      f"positions: cut the examples to at most {limit} tokens (e.g. "
                      "lm_examples(max_length=...)) or pack them")


def _class_labels(labels: list) -> np.ndarray:
    try:
        t = np.array([int(y) if isinstance(y, torch.Tensor) and y.dim() == 0
                      and not y.is_floating_point() else y for y in labels])
        if t.ndim == 1 and t.dtype.kind in "iu":
            return t.astype(np.int64)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        pass
    for i, y in enumerate(labels):
        if isinstance(y, (bool, np.bool_)) or not isinstance(y, (int, np.integer)) and not (
                isinstance(y, torch.Tensor) and y.dim() == 0 and not y.is_floating_point()):
            raise _Bad(i, f": labels = {str(y)[:40]} must be one integer class index for "
                          "classification")
    raise ValueError("labels could not be read as integer class indices")
