"""accumlab.integrations: the Trainer and Accelerate adapters take accumlab's exact steps.

Float64 tiny models, 14 padded variable-length examples in order, micro-batch 2 x 3
accumulation steps (windows of 3, 3 and 1 micro-batches: a short last window), constant LR,
no clipping, CPU. Each adapter's parameters after every optimizer step are compared with
accumlab.train's: relative to the size of the update (far stricter than relative to the
parameters), the difference is below 1e-12 (measured on one process: ExactTrainer 0,
bit-identical; AccelerateWindows 1e-15 with SGD, 3e-14 with AdamW; on two: at most 1.2e-15). The plain Trainer and Accelerate loops on the same data are asserted to be
off, by the factors that the adapters fix: BERT classification x3, x3, x1 per window
(huggingface/transformers#47688), a stock GPT-2 n / (n + rows) (labels counted before the
shift). Run `pytest -s` to see the measured numbers.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")

from accumlab.data.mlm import MASK_ID, mask_tokens  # noqa: E402
from accumlab.engine.models import make_model  # noqa: E402
from accumlab.integrations import (  # noqa: E402
    AccelerateWindows,
    ExactTrainer,
    ItemCountIgnoredWarning,
    loss_ignores_item_count,
)
from accumlab.lab import semantics  # noqa: E402

TESTS = Path(__file__).parent
EXACT = 1e-12
N, MICRO, ACCUM = 14, 2, 3  # 7 micro-batches: windows of 3, 3 and 1
TASKS = {"gpt2_stock": "causal_lm", "bert_cls": "classification", "bert_mlm": "masked_lm"}
OPTIMIZERS = {"sgd": ("sgd", 0.05), "adamw": ("adamw_torch", 1e-3)}  # Trainer name, lr


def mlm_examples(n: int = N, seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for d in semantics.padded_lm_examples(n, seed):
        ids, labels = mask_tokens(d["input_ids"], generator=g)
        out.append({"input_ids": ids, "labels": labels})
    return out


def build(name: str):
    """(fresh float64 model, its data) for a model name."""
    if name == "gpt2_stock":
        model = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
        model.loss_type = None  # as built from a config: the plain Trainer counts unshifted
        return model, semantics.padded_lm_examples(N)
    if name == "bert_cls":
        return (make_model("bert", "tiny", num_labels=3, seed=0, dtype=torch.float64),
                semantics.classification_examples(N))
    return (make_model("bert", "tiny", task="masked_lm", vocab_size=MASK_ID + 1, seed=0,
                       dtype=torch.float64), mlm_examples())


@functools.cache
def run(name: str, optim: str, how: str):
    """Parameter snapshots after each optimizer step, and the warnings raised meanwhile.

    `how`: "accumlab", "accumlab_nowd", "exact" (ExactTrainer), "plain" (Trainer),
    "accelerate_windows" or "accelerate" (the guide's loop). AdamW: weight decay 0.01 for
    the Trainer and accumlab (both spare biases and LayerNorm weights), none for Accelerate.
    """
    model, data = build(name)
    hf_optim, lr = OPTIMIZERS[optim]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if how.startswith("accumlab"):  # "accumlab_nowd": AdamW without weight decay
            decay = 0.01 if optim == "adamw" and how == "accumlab" else 0.0
            after = semantics.accumlab_steps(model, data, micro=MICRO, accum=ACCUM, lr=lr,
                                             precision="fp64", optimizer=optim,
                                             weight_decay=decay)
        elif how == "accelerate_windows":
            after = semantics.accelerate_steps(model, data, micro=MICRO, accum=ACCUM, lr=lr,
                                               recipe="windows", windows=AccelerateWindows,
                                               optimizer=optim)
        elif how == "accelerate":
            after = semantics.accelerate_steps(model, data, micro=MICRO, accum=ACCUM, lr=lr,
                                               optimizer=optim)
        else:
            cls = ExactTrainer if how == "exact" else None
            after = semantics.trainer_steps(model, data, micro=MICRO, accum=ACCUM, lr=lr,
                                            trainer_cls=cls, optim=hf_optim,
                                            weight_decay=0.01 if optim == "adamw" else 0.0)[0]
    return after, [w.category for w in caught]


def p0(name: str) -> torch.Tensor:
    return semantics.params_vector(build(name)[0])


def update_rel(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    """||a - b|| / ||b - start||: the difference relative to the size of b's update."""
    return float((a - b).norm() / (b - start).norm())


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("name", list(TASKS))
def test_exact_trainer_takes_accumlabs_steps(name, optim):
    ours, _ = run(name, optim, "accumlab")
    exact, _ = run(name, optim, "exact")
    start = p0(name)
    assert len(exact) == len(ours) == 3  # windows of 3, 3, 1 micro-batches: 3 steps
    diffs = [update_rel(e, o, start) for e, o in zip(exact, ours)]
    print(f"\n[{name} {optim} fp64] ExactTrainer vs accumlab.train, per step: "
          + ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) < EXACT


def test_exact_trainer_samples_normalization_takes_accumlabs_steps():
    """normalization="samples": every sequence weighs the same (its mean token loss)."""
    model, data = build("gpt2_stock")
    start = semantics.params_vector(model)
    kw = {"micro": MICRO, "accum": ACCUM, "lr": 0.05}
    ours = semantics.accumlab_steps(copy.deepcopy(model), data, precision="fp64",
                                    loss_normalization="samples", **kw)
    exact, _ = semantics.trainer_steps(copy.deepcopy(model), data, **kw,
                                       trainer_cls=functools.partial(ExactTrainer,
                                                                     normalization="samples"))
    tokens, _ = run("gpt2_stock", "sgd", "accumlab")
    assert max(update_rel(e, o, start) for e, o in zip(exact, ours)) < EXACT
    assert update_rel(tokens[-1], ours[-1], start) > 1e-3  # a different target than tokens


def test_plain_trainer_bert_classification_is_k_times_too_large_per_window():
    """The head ignores num_items_in_batch; the Trainer skips / GA: x3, x3, x1 on 3, 3, 1."""
    plain, _ = run("bert_cls", "sgd", "plain")
    ours, _ = run("bert_cls", "sgd", "accumlab")
    model, data = build("bert_cls")
    records = semantics.compare_to_exact(model, data, plain, micro=MICRO, accum=ACCUM,
                                         lr=OPTIMIZERS["sgd"][1], task="classification")
    ratios = [r["norm_ratio"] for r in records]
    start = p0("bert_cls")
    total = float((plain[-1] - start).norm() / (ours[-1] - start).norm())
    print(f"\n[bert_cls sgd] plain Trainer update / exact update per window: {ratios}; "
          f"whole run (final parameters): x{total:.3f}")
    assert [r["micro_batches"] for r in records] == [3, 3, 1]
    assert ratios == pytest.approx([3, 3, 1], rel=1e-9)
    assert total > 2


def test_plain_trainer_stock_gpt2_counts_before_the_shift():
    plain, _ = run("gpt2_stock", "sgd", "plain")
    ours, _ = run("gpt2_stock", "sgd", "accumlab")
    model, data = build("gpt2_stock")
    records = semantics.compare_to_exact(model, data, plain, micro=MICRO, accum=ACCUM,
                                         lr=OPTIMIZERS["sgd"][1])
    expected = [sum(r["items"]) / (sum(r["items"]) + MICRO * r["micro_batches"])
                for r in records]
    ratios = [r["norm_ratio"] for r in records]
    start = p0("gpt2_stock")
    total = float((plain[-1] - start).norm() / (ours[-1] - start).norm())
    print(f"\n[gpt2 stock sgd] plain Trainer update / exact per window: {ratios} "
          f"(n / (n + rows): {expected}); whole run: x{total:.3f}")
    # GPT-2's own loss upcasts float64 logits to float32 (loss_utils.py): 5e-8 measured
    assert ratios == pytest.approx(expected, rel=1e-6)
    assert total < 0.97


@pytest.mark.parametrize("name", ["bert_cls", "gpt2_stock"])
def test_plain_trainer_with_adamw_ends_elsewhere(name):
    plain, _ = run(name, "adamw", "plain")
    ours, _ = run(name, "adamw", "accumlab")
    off = update_rel(plain[-1], ours[-1], p0(name))
    print(f"\n[{name} adamw] plain Trainer vs accumlab, final parameters: {off:.2e} of the update")
    assert off > 1e-3


def test_the_adapter_warns_when_the_models_loss_ignores_the_count():
    assert ItemCountIgnoredWarning in run("bert_cls", "sgd", "exact")[1]
    assert ItemCountIgnoredWarning in run("bert_mlm", "sgd", "exact")[1]
    assert ItemCountIgnoredWarning not in run("gpt2_stock", "sgd", "exact")[1]


def test_loss_ignores_item_count_probe():
    batch = semantics.collate(semantics.classification_examples(4))
    bert = make_model("bert", "tiny", num_labels=3, seed=0)
    assert loss_ignores_item_count(bert, batch, "classification") is True
    lm_batch = semantics.collate(semantics.padded_lm_examples(4))
    gpt2 = make_model("gpt2", "tiny", seed=0)
    gpt2.loss_type = None
    assert loss_ignores_item_count(gpt2, lm_batch, "causal_lm") is False
    gpt2.accepts_loss_kwargs = False  # the Trainer then never passes a count
    assert loss_ignores_item_count(gpt2, lm_batch, "causal_lm") is None


def test_exact_trainer_refuses_what_its_cross_entropy_would_get_wrong(tmp_path):
    from transformers import TrainingArguments

    def args(**kw):
        return TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **kw)

    bert = make_model("bert", "tiny", num_labels=3, seed=0)
    with pytest.raises(ValueError, match="label_smoothing_factor=0"):
        ExactTrainer(model=bert, args=args(label_smoothing_factor=0.1))
    with pytest.raises(ValueError, match="drop compute_loss_func"):
        ExactTrainer(model=bert, args=args(), compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match="regression"):
        ExactTrainer(model=make_model("bert", "tiny", num_labels=1, seed=0), args=args())
    with pytest.raises(ValueError, match="'tokens' or 'samples'"):
        ExactTrainer(model=bert, args=args(), normalization="mean_of_means")


@pytest.mark.filterwarnings("ignore::accumlab.integrations.ItemCountIgnoredWarning")
def test_exact_trainer_evaluates_the_mean_loss():
    from accumlab.engine.losses import mean_loss

    model, data = build("bert_cls")
    after, trainer = semantics.trainer_steps(copy.deepcopy(model), data, micro=MICRO,
                                             accum=ACCUM, trainer_cls=ExactTrainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = trainer.evaluate(eval_dataset=data)["eval_loss"]
    batch = semantics.collate(data)
    with torch.no_grad():
        logits = trainer.model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
    want = float(mean_loss(logits, batch["labels"], "classification"))
    assert got == pytest.approx(want, rel=1e-10)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_accelerate_windows_take_accumlabs_steps(optim):
    ours, _ = run("gpt2_stock", optim, "accumlab" if optim == "sgd" else "accumlab_nowd")
    windows, _ = run("gpt2_stock", optim, "accelerate_windows")
    start = p0("gpt2_stock")
    diffs = [update_rel(w, o, start) for w, o in zip(windows, ours)]
    print(f"\n[gpt2 stock {optim} fp64] AccelerateWindows vs accumlab.train per step: "
          + ", ".join(f"{d:.1e}" for d in diffs))
    assert len(windows) == len(ours) == 3
    assert max(diffs) < EXACT


def test_plain_accelerate_loop_is_off_on_the_same_data():
    plain, _ = run("gpt2_stock", "sgd", "accelerate")
    model, data = build("gpt2_stock")
    records = semantics.compare_to_exact(model, data, plain, micro=MICRO, accum=ACCUM,
                                         lr=OPTIMIZERS["sgd"][1])
    print(f"\n[gpt2 stock sgd] Accelerate's accumulate() loop, per window: "
          f"{[(round(r['rel_diff'], 3), round(r['norm_ratio'], 3)) for r in records]}")
    assert min(r["rel_diff"] for r in records) > 0.05  # mean of means
    assert records[2]["norm_ratio"] < 0.5  # the 1-micro-batch window divided by K = 3


# ------------------------------------------------------------------ Accelerate: misuse is loud


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    acc = Accelerator(cpu=True, gradient_accumulation_steps=3)
    yield acc
    acc.free_memory()
    GradientState._reset_state()
    AcceleratorState._reset_state()


def _loop(accelerator, loader, use_accumulate=True):
    import contextlib

    model = make_model("gpt2", "tiny", seed=0)
    windows = AccelerateWindows(accelerator, model=model)
    for batch in windows.batches(loader):
        ctx = accelerator.accumulate(model) if use_accumulate else contextlib.nullcontext()
        with ctx:
            logits = model(input_ids=batch["input_ids"]).logits
            windows.loss(logits, batch["labels"]).backward()
    return windows


def test_accelerate_windows_needs_accumulate(accelerator):
    loader = accelerator.prepare(torch.utils.data.DataLoader(
        semantics.padded_lm_examples(12), batch_size=2, collate_fn=semantics.collate))
    with pytest.raises(RuntimeError, match="will not step after this window"):
        _loop(accelerator, loader, use_accumulate=False)


def test_accelerate_windows_short_window_needs_a_prepared_loader(accelerator):
    data = semantics.padded_lm_examples(14)  # 7 micro-batches: the last window holds 1
    plain = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=semantics.collate)
    with pytest.raises(RuntimeError, match="accelerator.prepare"):
        _loop(accelerator, plain)
    # prepared, the short one steps (and the pass above, left in its last window, shifts nothing)
    windows = _loop(accelerator, accelerator.prepare(plain))
    assert windows.windows_read == 3 and windows.window_size == 1


def test_accelerate_windows_loss_outside_a_window(accelerator):
    windows = AccelerateWindows(accelerator, task="causal_lm")
    batch = semantics.collate(semantics.padded_lm_examples(2))
    with pytest.raises(RuntimeError, match="outside a window"):
        windows.loss(torch.zeros(2, batch["labels"].shape[1], 8), batch["labels"])
    with pytest.raises(ValueError, match="model= .* or task="):
        AccelerateWindows(accelerator)


# ------------------------------------------------------------------ DDP: 2 processes, gloo


def test_adapters_under_ddp_equal_one_process(tmp_path):
    """2 ranks x micro 2 x 2 steps = one process with micro 2 x 4 (windows of 4, 4, 2)."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / "integrations_ddp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"integrations-{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    gpt2 = make_model("gpt2", "tiny", seed=0, dtype=torch.float64)
    bert = make_model("bert", "tiny", num_labels=3, seed=0, dtype=torch.float64)
    start = {"gpt2": semantics.params_vector(gpt2), "bert": semantics.params_vector(bert)}
    ref = {"gpt2": semantics.accumlab_steps(gpt2, semantics.padded_lm_examples(20), micro=2,
                                            accum=4, lr=0.5, precision="fp64"),
           "bert": semantics.accumlab_steps(bert, semantics.classification_examples(20),
                                            micro=2, accum=4, lr=0.05, precision="fp64")}
    for name, after in ranks[0].items():
        if name == "world":
            continue
        arch = "bert" if "bert" in name else "gpt2"
        assert len(after) == 3, name
        for a, b in zip(after, ranks[1][name]):
            assert torch.equal(a, b), f"{name}: the ranks hold different parameters"
        diffs = [update_rel(a, o, start[arch]) for a, o in zip(after, ref[arch])]
        ratio = float((after[0] - start[arch]).norm() / (ref[arch][0] - start[arch]).norm())
        print(f"\n[DDP 2 ranks, {name}] vs accumlab on one process, per step: "
              + ", ".join(f"{d:.1e}" for d in diffs) + f"; step-1 update ratio {ratio:.6f}")
        if name == "trainer_bert":  # plain Trainer: x GA 2 x 2 ranks (loss x num_processes)
            assert ratio == pytest.approx(4, rel=1e-9)
        else:
            assert max(diffs) < EXACT, name
