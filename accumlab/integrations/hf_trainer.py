"""Hugging Face's Trainer with accumlab's window: L_W = (sum of item losses) / N, exactly.

Two lines change in a Trainer script:

    from accumlab.integrations import ExactTrainer
    trainer = ExactTrainer(model=model, args=args, train_dataset=..., data_collator=...)

What the plain Trainer (transformers 5.24, trainer.py) does and what this class changes:

- `get_batch_samples` prefetches each window and counts `labels.ne(-100)`, *after* the causal
  shift only when `model.loss_type` maps to ForCausalLM (:543): a stock `GPT2LMHeadModel`
  (`loss_type` None) is counted before the shift, one extra item per row (PR #46204). Here
  the count is accumlab's `count_items` for the task: label tokens after the shift, masked
  tokens, or examples (and sequences under `normalization="samples"`), gathered over ranks.
- `compute_loss` lets the model average its own loss with `num_items_in_batch`, which BERT's
  heads ignore (#47688) while `training_step` skips its division by the accumulation steps,
  so the update is about k times too large. Here the loss is computed from the logits
  (`summed_loss`, in the logits' precision: a float64 model keeps a float64 loss) and divided
  by the window's N, times the number of processes because DDP averages gradients.
- A short last window is divided by its own N (the Trainer prefetches only what is left).

The Trainer's step, clipping, scheduler, no_sync and logging are untouched: the logged loss of
a step is L_W. `ExactLossMixin` does the same for another Trainer subclass
(`class MyTrainer(ExactLossMixin, SFTTrainer)`). Needs `accelerate` (the Trainer does).
"""

from __future__ import annotations

import warnings

import torch
from transformers import Trainer

from accumlab.engine.config import NORMALIZATIONS
from accumlab.engine.losses import count_items, detect_task, summed_loss
from accumlab.integrations.probe import ItemCountIgnoredWarning, loss_ignores_item_count

# transformers before 5.24 has no `loss_is_scaled_for_ga`; its training_step skips the division
# by the accumulation steps when the model takes loss kwargs and a count was passed.
_HAS_SCALED_FLAG = "loss_is_scaled_for_ga" in vars(Trainer)


class ExactLossMixin:
    """Trainer mixin: token- or sample-normalised loss over the whole window, from the logits.

    Keyword arguments (besides the Trainer's): `task` ("causal_lm", "masked_lm",
    "classification"; default: from the model's class) and `normalization` ("tokens" or
    "samples"). On the first training step it warns (`ItemCountIgnoredWarning`) when the
    model's own loss ignores `num_items_in_batch`, the case in which the plain Trainer is off.
    """

    loss_is_scaled_for_ga = True  # the loss below is already a share of L_W

    def __init__(self, *args, task: str | None = None, normalization: str = "tokens", **kwargs):
        if normalization not in NORMALIZATIONS or normalization == "mean_of_means":
            raise ValueError(f"normalization must be 'tokens' or 'samples', got {normalization!r}")
        super().__init__(*args, **kwargs)
        self.task = task or detect_task(self.model)
        self.normalization = normalization
        self._check_supported()
        self._probe_pending = True
        if not _HAS_SCALED_FLAG:
            self.model_accepts_loss_kwargs = True

    def _check_supported(self) -> None:
        """The loss here is plain cross-entropy over labels: say so when the run wants more."""
        config = getattr(self.model, "config", None)
        problem = getattr(config, "problem_type", None)
        if self.task == "classification" and (
                problem in ("regression", "multi_label_classification")
                or getattr(config, "num_labels", 2) == 1):
            raise ValueError(f"ExactTrainer computes cross-entropy over class labels; this model "
                             f"is set up for {problem or 'regression (num_labels=1)'}")
        if self.args.label_smoothing_factor:
            raise ValueError("ExactTrainer computes plain cross-entropy: set "
                             "label_smoothing_factor=0")
        if self.compute_loss_func is not None:
            raise ValueError("ExactTrainer computes the loss itself: drop compute_loss_func")

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Prefetch up to `num_batches` micro-batches; N = their items, summed over processes."""
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        if any("shift_labels" in b for b in batches):
            raise ValueError("ExactTrainer shifts causal-LM labels itself: give `labels`, not "
                             "`shift_labels` (padding-free collators are not supported)")
        if any("labels" not in b for b in batches):
            raise ValueError("ExactTrainer needs `labels` in every batch: the collator must "
                             "return them (-100 where no loss is taken)")
        local = sum(count_items(b["labels"], self.task, self.normalization) for b in batches)
        n_items = torch.tensor(local, dtype=torch.int64, device=device)
        if self.args.world_size > 1:
            n_items = self.accelerator.gather(n_items).sum()
        return batches, n_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """In training: this micro-batch's share of L_W. In evaluation: the batch's mean loss."""
        labels = inputs["labels"]
        if model.training and self._probe_pending:
            self._probe_pending = False
            self._warn_if_loss_ignores_count(model, inputs)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        total = summed_loss(logits, labels, self.task, self.normalization)
        if model.training and num_items_in_batch is not None:
            n = int(num_items_in_batch)
            if n == 0:
                warnings.warn("every label in this window is -100: its loss is 0, but the "
                              "Trainer still steps the optimizer (momentum, weight decay)",
                              stacklevel=2)
                loss = total * 0.0
            else:  # x processes: DDP averages the gradients of the ranks
                loss = total * (self.accelerator.num_processes / n)
        else:
            loss = total / max(1, count_items(labels, self.task, self.normalization))
        if not return_outputs:
            return loss
        return loss, outputs if isinstance(outputs, dict) else (loss, *outputs)

    def _warn_if_loss_ignores_count(self, model, inputs) -> None:
        k, ranks = self.args.gradient_accumulation_steps, self.accelerator.num_processes
        if k * ranks == 1:
            return  # one micro-batch on one process: the plain Trainer's mean is exact
        module = self.accelerator.unwrap_model(model)
        if not loss_ignores_item_count(module, inputs, self.task):
            return
        warnings.warn(
            f"{type(module).__name__}'s own loss ignores num_items_in_batch "
            "(huggingface/transformers#47688): with the plain Trainer each update would be the "
            f"sum of the window's micro-batch means over {k} steps x {ranks} processes, about "
            f"{k * ranks}x the exact one. This trainer computes the loss from the logits, so "
            "this run is exact.", ItemCountIgnoredWarning, stacklevel=3)


class ExactTrainer(ExactLossMixin, Trainer):
    """`transformers.Trainer` whose accumulated update is accumlab's exact one (see module doc)."""
