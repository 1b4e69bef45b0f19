"""Exact accumulation inside the tools people already use: the Trainer and Accelerate.

- `ExactTrainer` (hf_trainer.py): Hugging Face's `Trainer` whose update is the gradient of
  L_W = (sum of item losses over the window and all ranks) / N, for causal LM (a stock GPT-2
  included), masked LM and sequence classification (BERT heads included), short last windows
  and DDP. `ExactLossMixin` adds the same to another Trainer subclass.
- `AccelerateWindows` (hf_accelerate.py): inside `with accelerator.accumulate(model):`, each
  micro-batch's share of L_W, with N read a window ahead and summed over processes.
- `loss_ignores_item_count` (probe.py): does a model's own loss honour `num_items_in_batch`?

`transformers.Trainer` and `accelerate` are imported only when these names are used; the engine
never imports this package.
"""

from accumlab.integrations.probe import (
    ItemCountIgnoredWarning,
    loss_ignores_item_count,
    takes_loss_kwargs,
)

__all__ = ["AccelerateWindows", "ExactLossMixin", "ExactTrainer", "ItemCountIgnoredWarning",
           "loss_ignores_item_count", "takes_loss_kwargs"]

_LAZY = {"ExactTrainer": "hf_trainer", "ExactLossMixin": "hf_trainer",
         "AccelerateWindows": "hf_accelerate"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"accumlab.integrations.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'accumlab.integrations' has no attribute {name!r}")
