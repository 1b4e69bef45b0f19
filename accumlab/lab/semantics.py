"""Framework semantics side by side: whose accumulated update equals the exact one, and why not.

The same padded, variable-length causal-LM data (22 examples, micro-batch 2, 4 accumulation
steps: windows of 4, 4 and 3 micro-batches) is trained for one epoch with SGD at a constant LR
(so an update is -lr x gradient and every factor shows up as it is) by

- Hugging Face's Trainer on its `num_items_in_batch` path (the model takes loss kwargs);
- the Trainer with the model's own mean loss (`model.accepts_loss_kwargs = False`);
- the Trainer counting label tokens *before* the causal shift (a GPT-2 with `loss_type=None`);
- Accelerate's `accumulate()` loop as its guide writes it (mean loss per micro-batch);
- Accelerate's example for variable-size batches (the model's loss with `num_items_in_batch`);
- accumlab.train;
- with the adapters of `accumlab.integrations` passed in (the lab does not import that sibling
  layer): `ExactTrainer` on the stock GPT-2 (`loss_type=None`) and Accelerate's `accumulate()`
  with `AccelerateWindows`.

Each update is compared with the exact update of its window: one batch of all the window's
examples, token-mean loss, taken at the parameters the framework had before that step.
`EXPLANATIONS` says why each differs, with the issue numbers of
shared/reference/frameworks.md. `bert_side_by_side` does the same for BERT sequence
classification (windows of 3, 3 and 1 micro-batches), whose head ignores `num_items_in_batch`.
Needs `accelerate` (the Trainer imports it too).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.config import TrainConfig
from accumlab.engine.losses import count_items, mean_loss

N_EXAMPLES, MICRO, K, LR = 22, 2, 4, 0.5
PAD_ID = 1

EXPLANATIONS = {
    "trainer": (
        "exact: the window's label tokens are counted after the causal shift "
        "(num_items_in_batch, PR #34191/#34198, the shift since PR #46204) and the short last "
        "window is divided by its own count (PR #39659, issue #38837)"),
    "trainer_mean_loss": (
        "mean of micro-batch means / actual window length: every micro-batch weighs the same "
        "whatever its token count (transformers #24725, trl #2175; models without loss kwargs: "
        "#37766)"),
    "trainer_unshifted_count": (
        "counts label tokens before the shift, one extra per row, so each update is "
        "n / (n + rows) of the exact one (fixed by PR #46204 for models whose loss shifts)"),
    "accelerate": (
        "mean loss per micro-batch and backward() always divides by K=4: mean of means "
        "(#24725, trl #2175), and the 3-micro-batch last window, forced to step at the end of "
        "the loader, is scaled by 3/4 (like Lightning #19987)"),
    "accelerate_num_items": (
        "Accelerate's variable-size example: the x K cancels backward()'s fixed / K, even in "
        "the short window, but it counts labels.ne(-100) before the shift, so each update is "
        "n / (n + rows) of the exact one (the off-by-one of transformers PR #46204)"),
    "accumlab": "exact by contract: sum of token losses over the window / its own N",
    "trainer_exact": (
        "accumlab.integrations.ExactTrainer on the same stock GPT-2 (loss_type None): counts "
        "after the shift whatever loss_type says (fixes PR #46204's case) and computes the "
        "loss from the logits, so #47688's heads are exact too"),
    "accelerate_windows": (
        "accumlab.integrations.AccelerateWindows inside accumulate(): the window read ahead, "
        "N after the shift summed over processes (no mean of means: #24725, trl #2175), x K "
        "cancels backward()'s / K, so the short window is divided by its own N (not 3/4)"),
}


# ------------------------------------------------------------------------------ data


def padded_lm_examples(n: int = N_EXAMPLES, seed: int = 0) -> list[dict]:
    """Random causal-LM examples of lengths 5..40 (ids 2..4095), labels = input_ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 41, (1,), generator=g))
        ids = torch.randint(2, 4096, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def collate(examples: Sequence[dict]) -> dict:
    """`pad_collate` with the shipped tokenizer's pad id (right padding, labels -100)."""
    return pad_collate(examples, PAD_ID)


def window_examples(data: Sequence[dict], micro: int, accum: int) -> list[list[dict]]:
    """The examples of each window, in order (the last window may be short)."""
    per_window = micro * accum
    return [list(data[i:i + per_window]) for i in range(0, len(data), per_window)]


def params_vector(model: torch.nn.Module) -> torch.Tensor:
    """All parameters as one float64 vector (a snapshot)."""
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def _load_vector(model: torch.nn.Module, vector: torch.Tensor) -> None:
    start = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(vector[start:start + p.numel()].view_as(p).to(p.dtype))
            start += p.numel()


# ------------------------------------------------------------------------------ runners


def trainer_steps(model: torch.nn.Module, data: Sequence[dict], *, micro: int = MICRO,
                  accum: int = K, lr: float = LR, out_dir: str | None = None,
                  trainer_cls=None, optim: str = "sgd", weight_decay: float = 0.0):
    """Train one epoch with Hugging Face's Trainer (constant LR, no clipping, CPU).

    `optim` is the Trainer's name ("sgd", "adamw_torch"); `trainer_cls` a Trainer subclass
    (default `transformers.Trainer`; `accumlab.integrations.ExactTrainer` for the adapter).
    Returns (parameter snapshots after every optimizer step, the trainer).
    """
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    trainer_cls = trainer_cls or Trainer

    after: list[torch.Tensor] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after.append(params_vector(model))

    with tempfile.TemporaryDirectory(prefix="accumlab_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=out_dir or tmp, per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum, num_train_epochs=1, learning_rate=lr,
            optim=optim, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=weight_decay,
            max_grad_norm=0.0, train_sampling_strategy="sequential",
            remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            seed=0,
        )
        trainer = trainer_cls(model=model, args=args, train_dataset=list(data),
                              data_collator=collate, callbacks=[Snapshot()])
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        trainer.train()
    return after, trainer


def accelerate_steps(model: torch.nn.Module, data: Sequence[dict], *, micro: int = MICRO,
                     accum: int = K, lr: float = LR, recipe: str = "mean",
                     windows=None, optimizer: str = "sgd",
                     sync_each_batch: bool = False) -> list[torch.Tensor]:
    """Train one epoch with Accelerate's `accumulate()` loop, as its guide writes it.

    recipe "mean": `loss = model(**batch).loss` (mean per micro-batch), `accelerator.backward`.
    recipe "num_items": Accelerate's example for variable-size batches
    (examples/by_feature/gradient_accumulation_for_autoregressive_models.py): prefetch the
    window, gather its label count N (`labels.ne(-100)`, as the example counts: before the
    shift), pass it to the model's loss, multiply by K x processes, step once per window.
    recipe "windows": the guide's loop with `windows = windows(accelerator, model=model)`
    (`accumlab.integrations.AccelerateWindows`): `for batch in windows.batches(loader)` and
    `loss = windows.loss(logits, labels)` inside `accumulate()`.
    `optimizer` is "sgd" or "adamw" (torch defaults, no weight decay); `sync_each_batch` is
    Accelerate's GradientAccumulationPlugin option (all-reduce on every micro-batch).
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import GradientAccumulationPlugin

    if recipe not in ("mean", "num_items", "windows"):
        raise ValueError(f"recipe must be 'mean', 'num_items' or 'windows', got {recipe!r}")
    if recipe == "windows" and windows is None:
        raise ValueError("recipe 'windows' needs windows=AccelerateWindows "
                         "(from accumlab.integrations)")
    plugin = GradientAccumulationPlugin(num_steps=accum, sync_each_batch=sync_each_batch)
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=plugin)
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    opt_cls = torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW
    optimizer = opt_cls(model.parameters(), lr=lr, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(list(data), batch_size=micro, shuffle=False,
                                         collate_fn=collate)
    net, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    net.train()
    after: list[torch.Tensor] = []
    try:
        if recipe == "mean":
            for batch in loader:
                with accelerator.accumulate(net):
                    loss = net(**batch).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    after.append(params_vector(model))
        elif recipe == "windows":
            exact = windows(accelerator, model=model)
            for batch in exact.batches(loader):
                with accelerator.accumulate(net):
                    logits = net(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).logits
                    accelerator.backward(exact.loss(logits, batch["labels"]))
                    optimizer.step()
                    optimizer.zero_grad()
                if accelerator.sync_gradients:
                    after.append(params_vector(model))
        else:  # examples/by_feature/gradient_accumulation_for_autoregressive_models.py
            batches = iter(loader)
            while window := [b for _, b in zip(range(accum), batches)]:
                local = sum(b["labels"].ne(-100).sum() for b in window)  # as the example counts
                n_items = accelerator.gather(local).sum().item()
                for batch in window:
                    loss = net(**batch, num_items_in_batch=n_items).loss
                    loss = loss * accum * accelerator.num_processes
                    accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
                after.append(params_vector(model))
    finally:  # Accelerate keeps process-wide singletons; leave none behind for the next run
        accelerator.free_memory()
        GradientState._reset_state()
        AcceleratorState._reset_state()
    return after


def accumlab_steps(model: torch.nn.Module, data: Sequence[dict], *, micro: int = MICRO,
                   accum: int = K, lr: float = LR, **overrides) -> list[torch.Tensor]:
    """Train one epoch with accumlab.train (SGD, constant LR); snapshots after every step."""
    from accumlab.engine.trainer import train

    after: list[torch.Tensor] = []
    settings = dict(micro_batch_size=micro, accum_steps=accum, epochs=1, optimizer="sgd", lr=lr,
                    shuffle=False, partial_window="step", progress=False, device="cpu",
                    pad_token_id=PAD_ID)
    cfg = TrainConfig(**(settings | overrides))
    train(model, list(data), cfg, callbacks=[lambda entry: after.append(params_vector(model))])
    return after


# ------------------------------------------------------------------------------ comparison


def exact_update(model: torch.nn.Module, before: torch.Tensor, examples: Sequence[dict],
                 lr: float, task: str = "causal_lm") -> torch.Tensor:
    """The SGD update of one batch of all `examples` (item-mean loss) from `before`."""
    probe = copy.deepcopy(model)
    _load_vector(probe, before)
    probe.train()
    probe.zero_grad(set_to_none=True)
    batch = collate(examples)
    logits = probe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean_loss(logits, batch["labels"], task).backward()
    with torch.no_grad():
        for p in probe.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    return params_vector(probe) - before


def compare_to_exact(init: torch.nn.Module, data: Sequence[dict], after: Sequence[torch.Tensor],
                     *, micro: int = MICRO, accum: int = K, lr: float = LR,
                     task: str = "causal_lm") -> list[dict]:
    """One record per optimizer step: relative difference and norm ratio to the exact update."""
    windows = window_examples(data, micro, accum)
    if len(after) != len(windows):
        raise ValueError(f"{len(after)} optimizer steps for {len(windows)} windows: the "
                         "framework did not step once per window")
    records, before = [], params_vector(init)
    for i, (examples, now) in enumerate(zip(windows, after)):
        update, exact = now - before, exact_update(init, before, examples, lr, task)
        batches = [collate(examples[j:j + micro]) for j in range(0, len(examples), micro)]
        records.append({
            "window": i + 1,
            "micro_batches": len(batches),
            "items": [count_items(b["labels"], task) for b in batches],
            "rel_diff": float((update - exact).norm() / exact.norm()),
            "norm_ratio": float(update.norm() / exact.norm()),
        })
        before = now
    return records


def _compare_all(init, data, runs: dict, task: str, kw: dict) -> dict[str, list[dict]]:
    import warnings

    from accumlab.engine.window import MeanOfMeansWarning

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeanOfMeansWarning)
        warnings.filterwarnings("ignore", message=".*ignores num_items_in_batch")
        for name, run in runs.items():
            out[name] = compare_to_exact(init, data, run(copy.deepcopy(init)), task=task, **kw)
    return out


def side_by_side(data: Sequence[dict] | None = None, *, micro: int = MICRO, accum: int = K,
                 lr: float = LR, seed: int = 0, exact_trainer=None,
                 accelerate_windows=None) -> dict[str, list[dict]]:
    """Run every framework on the same data from the same weights; per-window records each.

    `exact_trainer` / `accelerate_windows`: `accumlab.integrations.ExactTrainer` /
    `AccelerateWindows`, to add the adapters' rows ("trainer_exact", "accelerate_windows").
    """
    from accumlab.engine.models import make_model

    data = list(data) if data is not None else padded_lm_examples()
    init = make_model("gpt2", "tiny", seed=seed)
    kw = {"micro": micro, "accum": accum, "lr": lr}

    def without_loss_kwargs(m):
        m.accepts_loss_kwargs = False
        return m

    def stock(m):
        m.loss_type = None  # a GPT2LMHeadModel as built: transformers counts before the shift
        return m

    runs = {
        "trainer": lambda m: trainer_steps(m, data, **kw)[0],
        "trainer_mean_loss": lambda m: trainer_steps(without_loss_kwargs(m), data, **kw)[0],
        "trainer_unshifted_count": lambda m: trainer_steps(stock(m), data, **kw)[0],
        "trainer_exact": lambda m: trainer_steps(stock(m), data, trainer_cls=exact_trainer,
                                                 **kw)[0],
        "accelerate": lambda m: accelerate_steps(m, data, **kw),
        "accelerate_num_items": lambda m: accelerate_steps(m, data, recipe="num_items", **kw),
        "accelerate_windows": lambda m: accelerate_steps(m, data, recipe="windows",
                                                         windows=accelerate_windows, **kw),
        "accumlab": lambda m: accumlab_steps(m, data, **kw),
    }
    if exact_trainer is None:
        del runs["trainer_exact"]
    if accelerate_windows is None:
        del runs["accelerate_windows"]
    return _compare_all(init, data, runs, "causal_lm", kw)


BERT_EXPLANATIONS = {
    "trainer": (
        "BERT's head takes **kwargs but ignores num_items_in_batch (a plain mean), and the "
        "Trainer then skips its / GA: the sum of the window's micro-batch means, x its "
        "micro-batches (huggingface/transformers#47688)"),
    "trainer_exact": "accumlab.integrations.ExactTrainer: loss from the logits / the window's N",
    "accumlab": "exact by contract: sum of example losses over the window / its own N",
}


def classification_examples(n: int = 14, seed: int = 1, num_labels: int = 3) -> list[dict]:
    """Variable-length classification examples (the token ids of `padded_lm_examples`)."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": d["input_ids"],
             "labels": int(torch.randint(0, num_labels, (1,), generator=g))}
            for d in padded_lm_examples(n, seed)]


def bert_side_by_side(exact_trainer=None, *, n_examples: int = 14, micro: int = 2,
                      accum: int = 3, lr: float = 0.05, seed: int = 0) -> dict[str, list[dict]]:
    """BERT sequence classification, windows of 3, 3 and 1 micro-batches of 2 examples.

    The plain Trainer, `exact_trainer` (`accumlab.integrations.ExactTrainer`, if given) and
    accumlab.train, each update against the exact one (SGD, constant LR, fp32, CPU).
    """
    from accumlab.engine.models import make_model

    data = classification_examples(n_examples)
    init = make_model("bert", "tiny", num_labels=3, seed=seed)
    kw = {"micro": micro, "accum": accum, "lr": lr}
    runs = {"trainer": lambda m: trainer_steps(m, data, **kw)[0],
            "trainer_exact": lambda m: trainer_steps(m, data, trainer_cls=exact_trainer,
                                                     **kw)[0],
            "accumlab": lambda m: accumlab_steps(m, data, **kw)}
    if exact_trainer is None:
        del runs["trainer_exact"]
    return _compare_all(init, data, runs, "classification", kw)


def format_side_by_side(results: dict[str, list[dict]],
                        explanations: dict[str, str] | None = None) -> list[str]:
    """Printable lines: per framework, each window's relative difference and norm ratio."""
    explanations = EXPLANATIONS if explanations is None else explanations
    lines = []
    for name, records in results.items():
        cells = "  ".join(f"w{r['window']}({r['micro_batches']}): {r['rel_diff']:.1e} "
                          f"x{r['norm_ratio']:.3f}" for r in records)
        lines.append(f"{name:<24} {cells}")
        lines.append(f"{'':<24} why: {explanations.get(name, '')}")
    return lines
