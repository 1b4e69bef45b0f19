"""Framework semantics side by side: whose accumulated update equals the exact one, and why not.

The same padded, variable-length causal-LM data (22 examples, micro-batch 2, 4 accumulation
steps: windows of 4, 4 and 3 micro-batches) is trained for one epoch with SGD at a constant LR
(so an update is -lr x gradient and every factor shows up as it is) by

- Hugging Face's Trainer on its `num_items_in_batch` path (the model takes loss kwargs);
- the Trainer with the model's own mean loss (`model.accepts_loss_kwargs = False`);
- the Trainer counting label tokens *before* the causal shift (a GPT-2 with `loss_type=None`);
- Accelerate's `accumulate()` loop as its guide writes it (mean loss per micro-batch);
- Accelerate's example for variable-size batches (the model's loss with `num_items_in_batch`);
- accumlab.train.

Each update is compared with the exact update of its window: one batch of all the window's
examples, token-mean loss, taken at the parameters the framework had before that step.
`EXPLANATIONS` says why each differs, with the issue numbers of
shared/reference/frameworks.md. Needs `accelerate` (the Trainer imports it too).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.config import TrainConfig
from accumlab.engine.losses import mean_loss

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
                  accum: int = K, lr: float = LR, out_dir: str | None = None):
    """Train one epoch with Hugging Face's Trainer (SGD, constant LR, no clipping, CPU).

    Returns (parameter snapshots after every optimizer step, the trainer).
    """
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    after: list[torch.Tensor] = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            after.append(params_vector(model))

    with tempfile.TemporaryDirectory(prefix="accumlab_trainer_") as tmp:
        args = TrainingArguments(
            output_dir=out_dir or tmp, per_device_train_batch_size=micro,
            gradient_accumulation_steps=accum, num_train_epochs=1, learning_rate=lr,
            optim="sgd", lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=0.0, train_sampling_strategy="sequential",
            remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=list(data),
                          data_collator=collate, callbacks=[Snapshot()])
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        trainer.train()
    return after, trainer


def accelerate_steps(model: torch.nn.Module, data: Sequence[dict], *, micro: int = MICRO,
                     accum: int = K, lr: float = LR, recipe: str = "mean") -> list[torch.Tensor]:
    """Train one epoch with Accelerate's `accumulate()` loop, as its guide writes it.

    recipe "mean": `loss = model(**batch).loss` (mean per micro-batch), `accelerator.backward`.
    recipe "num_items": Accelerate's example for variable-size batches
    (examples/by_feature/gradient_accumulation_for_autoregressive_models.py): prefetch the
    window, gather its label count N (`labels.ne(-100)`, as the example counts: before the
    shift), pass it to the model's loss, multiply by K x processes, step once per window.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    if recipe not in ("mean", "num_items"):
        raise ValueError(f"recipe must be 'mean' or 'num_items', got {recipe!r}")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
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
                 lr: float) -> torch.Tensor:
    """The SGD update of one batch of all `examples` (token-mean loss) from `before`."""
    probe = copy.deepcopy(model)
    _load_vector(probe, before)
    probe.train()
    probe.zero_grad(set_to_none=True)
    batch = collate(examples)
    logits = probe(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mean_loss(logits, batch["labels"], "causal_lm").backward()
    with torch.no_grad():
        for p in probe.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
    return params_vector(probe) - before


def compare_to_exact(init: torch.nn.Module, data: Sequence[dict], after: Sequence[torch.Tensor],
                     *, micro: int = MICRO, accum: int = K, lr: float = LR) -> list[dict]:
    """One record per optimizer step: relative difference and norm ratio to the exact update."""
    windows = window_examples(data, micro, accum)
    if len(after) != len(windows):
        raise ValueError(f"{len(after)} optimizer steps for {len(windows)} windows: the "
                         "framework did not step once per window")
    records, before = [], params_vector(init)
    for i, (examples, now) in enumerate(zip(windows, after)):
        update, exact = now - before, exact_update(init, before, examples, lr)
        batches = [collate(examples[j:j + micro]) for j in range(0, len(examples), micro)]
        records.append({
            "window": i + 1,
            "micro_batches": len(batches),
            "label_tokens": [int((b["labels"][:, 1:] != -100).sum()) for b in batches],
            "rel_diff": float((update - exact).norm() / exact.norm()),
            "norm_ratio": float(update.norm() / exact.norm()),
        })
        before = now
    return records


def side_by_side(data: Sequence[dict] | None = None, *, micro: int = MICRO, accum: int = K,
                 lr: float = LR, seed: int = 0) -> dict[str, list[dict]]:
    """Run every framework on the same data from the same weights; per-window records each."""
    import warnings

    from accumlab.engine.models import make_model
    from accumlab.engine.window import MeanOfMeansWarning

    data = list(data) if data is not None else padded_lm_examples()
    init = make_model("gpt2", "tiny", seed=seed)
    no_kwargs = copy.deepcopy(init)
    no_kwargs.accepts_loss_kwargs = False
    unshifted = copy.deepcopy(init)
    unshifted.loss_type = None  # transformers then counts the labels before the shift
    kw = {"micro": micro, "accum": accum, "lr": lr}
    runs = {
        "trainer": lambda: trainer_steps(copy.deepcopy(init), data, **kw)[0],
        "trainer_mean_loss": lambda: trainer_steps(no_kwargs, data, **kw)[0],
        "trainer_unshifted_count": lambda: trainer_steps(unshifted, data, **kw)[0],
        "accelerate": lambda: accelerate_steps(copy.deepcopy(init), data, **kw),
        "accelerate_num_items": lambda: accelerate_steps(copy.deepcopy(init), data,
                                                         recipe="num_items", **kw),
        "accumlab": lambda: accumlab_steps(copy.deepcopy(init), data, **kw),
    }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeanOfMeansWarning)
        for name, run in runs.items():
            out[name] = compare_to_exact(init, data, run(), **kw)
    return out


def format_side_by_side(results: dict[str, list[dict]]) -> list[str]:
    """Printable lines: per framework, each window's relative difference and norm ratio."""
    lines = []
    for name, records in results.items():
        cells = "  ".join(f"w{r['window']}({r['micro_batches']}): {r['rel_diff']:.1e} "
                          f"x{r['norm_ratio']:.3f}" for r in records)
        lines.append(f"{name:<24} {cells}")
        lines.append(f"{'':<24} why: {EXPLANATIONS.get(name, '')}")
    return lines
