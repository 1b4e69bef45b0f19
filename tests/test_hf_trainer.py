"""Cross-check accumlab.train against Hugging Face's Trainer on identical micro-batches.

Both sides get the same initial weights, the same collator (`pad_collate`, pad id 1), no
shuffling, SGD at a constant LR (so an update is lr x gradient and factors show up exactly),
no weight decay, no clipping, fp32 on CPU, micro-batch 2 x 4 accumulation steps, and 22
examples: 11 micro-batches = 2 full windows + a partial window of 3 micro-batches.

Line numbers below are transformers 5.24.0 `trainer.py`. Run `pytest -s` to see the measured
differences.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import accumlab
from accumlab.engine.models import make_model

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

from accumlab.lab.semantics import (
    # noqa: E402
    MICRO,
    K,
    accumlab_steps,
    collate,
    padded_lm_examples,
    params_vector,
    trainer_steps,
)

N_EXAMPLES, LR = 22, 0.5
lm_examples = padded_lm_examples


def cls_examples(n: int = N_EXAMPLES, seed: int = 1, num_labels: int = 3) -> list[dict]:
    """Random variable-length classification examples with int labels."""
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": d["input_ids"],
             "labels": int(torch.randint(0, num_labels, (1,), generator=g))}
            for d in lm_examples(n, seed)]


def hf_train(model, data, tmp_path=None, *, micro=MICRO, accum=K, lr=LR, name="hf"):
    """The Trainer's parameter snapshots (`.after`) and the trainer itself (`.trainer`)."""
    after, trainer = trainer_steps(model, data, micro=micro, accum=accum, lr=lr)
    return SimpleNamespace(after=after, trainer=trainer)


def accumlab_train(model, data, *, micro=MICRO, accum=K, lr=LR, **overrides) -> list:
    """Train with accumlab; returns the parameters after every optimizer step."""
    return accumlab_steps(model, data, micro=micro, accum=accum, lr=lr, **overrides)


def per_tensor_max_rel(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest ||a_i - b_i|| / ||b_i|| over the parameter tensors."""
    worst = 0.0
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        pa, pb = pa.detach().double(), pb.detach().double()
        worst = max(worst, float((pa - pb).norm() / pb.norm().clamp(min=1e-30)))
    return worst


def update_rel(after_a: torch.Tensor, after_b: torch.Tensor, before: torch.Tensor) -> float:
    """||update_a - update_b|| / ||update_b||: far more sensitive than comparing parameters."""
    ua, ub = after_a - before, after_b - before
    return float((ua - ub).norm() / ub.norm())


def norm_ratio(after_a: torch.Tensor, after_b: torch.Tensor, before: torch.Tensor) -> float:
    return float((after_a - before).norm() / (after_b - before).norm())


def test_gpt2_causal_lm_matches_trainer(tmp_path):
    """Causal LM with a partial last window: accumlab and the Trainer take the same steps.

    Why they agree in transformers 5.24 (trainer.py):
    - :1869-1881 the epoch is cut into windows of GA micro-batches, the last one holding the
      remainder (here 3), prefetched by get_batch_samples (:2289);
    - :2335-2343 num_items_in_batch = labels[..., 1:].ne(-100).sum() over the window, *after*
      the shift because make_model sets loss_type="ForCausalLM" (:543 _loss_shifts_labels);
    - :2167-2171 N goes to GPT-2's loss, sum(CE)/N (loss/loss_utils.py fixed_cross_entropy),
      and :2111-2119 then skips the division by GA, so the partial window is normalised by its
      own N as well — exactly accumlab's contract.
    """
    data = lm_examples()
    init = make_model("gpt2", "tiny", seed=0)
    p0 = params_vector(init)

    ours = copy.deepcopy(init)
    ours_steps = accumlab_train(ours, data)
    hf = copy.deepcopy(init)
    snap = hf_train(hf, data, tmp_path)
    trainer = snap.trainer
    assert trainer.model_accepts_loss_kwargs
    assert getattr(trainer, "_loss_shifts_labels", None), (
        "this transformers counts num_items_in_batch before the causal shift (PR #46204 "
        "added _loss_shifts_labels), so its updates are n / (n + rows) of accumlab's")
    assert len(ours_steps) == len(snap.after) == 3  # 2 full windows + the partial one

    param_rel = per_tensor_max_rel(ours, hf)
    upd = update_rel(params_vector(ours), params_vector(hf), p0)
    first = update_rel(ours_steps[0], snap.after[0], p0)
    print(f"\n[gpt2 causal LM, 22 ex, 2x4, partial window of 3] accumlab vs Trainer: "
          f"max per-tensor param rel diff {param_rel:.3e}, total-update rel diff {upd:.3e}, "
          f"step-1 update rel diff {first:.3e}")
    assert param_rel < 1e-6
    assert upd < 1e-4

    # Control: the comparison can see a wrong normalisation. Mean of micro-batch means
    # (what a naive loop does) gives a visibly different update on this padded data.
    naive = copy.deepcopy(init)
    with pytest.warns(accumlab.MeanOfMeansWarning):
        accumlab_train(naive, data, loss_normalization="mean_of_means")
    naive_upd = update_rel(params_vector(naive), params_vector(hf), p0)
    print(f"  control: accumlab mean_of_means vs Trainer: total-update rel diff {naive_upd:.3e}")
    assert naive_upd > 1e-2


def test_gpt2_without_loss_type_counts_unshifted_labels(tmp_path):
    """Pitfall 2: a GPT2LMHeadModel built without loss_type="ForCausalLM" (its default, None).

    trainer.py:543 then sets _loss_shifts_labels False, so :2335-2343 counts labels[...] before
    the shift: one extra item per row. GPT-2's loss still divides the shifted CE sum by that N,
    so the Trainer's update is smaller by N_shifted / N_unshifted = n / (n + rows) per window.
    """
    data = lm_examples()[:MICRO * K]  # one full window is enough to see the factor
    init = make_model("gpt2", "tiny", seed=0)
    init.loss_type = None
    p0 = params_vector(init)
    ours_steps = accumlab_train(copy.deepcopy(init), data)
    snap = hf_train(copy.deepcopy(init), data, tmp_path)
    assert not getattr(snap.trainer, "_loss_shifts_labels", False)

    window = [collate(data[i:i + MICRO]) for i in range(0, MICRO * K, MICRO)]
    shifted = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
    unshifted = sum(int((b["labels"] != -100).sum()) for b in window)
    expected = shifted / unshifted
    ratio = norm_ratio(snap.after[0], ours_steps[0], p0)
    scaled = update_rel(p0 + (ours_steps[0] - p0) * expected, snap.after[0], p0)
    print(f"\n[gpt2, loss_type=None] step-1 update Trainer/accumlab = {ratio:.6f}, expected "
          f"{shifted}/{unshifted} = {expected:.6f}; accumlab x expected vs Trainer rel diff "
          f"{scaled:.3e}")
    assert ratio == pytest.approx(expected, rel=1e-5)
    assert scaled < 1e-4


def test_bert_classification_trainer_ga_is_k_times_too_large(tmp_path):
    """Pitfall 3 (huggingface/transformers#47688): BERT heads drop num_items_in_batch.

    BertForSequenceClassification.forward takes **kwargs, so trainer.py:518-523 sets
    model_accepts_loss_kwargs=True; :2167-2171 passes N, which the head ignores (plain
    CrossEntropyLoss() mean, modeling_bert.py:1130); and :2111-2119 skips the division by GA
    because it believes N was used. The accumulated gradient is then the *sum* of the
    micro-batch means: x GA (here x4, x3 on the partial window) against one large batch.
    Setting model.accepts_loss_kwargs = False restores loss / GA (mean of means, exact here
    because every micro-batch holds 2 examples). accumlab counts examples itself and matches.
    """
    data = cls_examples()
    init = make_model("bert", "tiny", num_labels=3, seed=0)
    lr = 0.05  # small enough that x4 steps stay well-behaved
    p0 = params_vector(init)

    # Reference: the Trainer on one large batch per step (8 = 2 x 4 examples), no GA.
    ref = hf_train(copy.deepcopy(init), data, tmp_path, micro=MICRO * K, accum=1, lr=lr,
                   name="ref")
    assert len(ref.after) == 3
    ref_final = ref.after[-1]

    ours = accumlab_train(copy.deepcopy(init), data, lr=lr)
    ours_vs_ref = update_rel(ours[-1], ref_final, p0)

    buggy = hf_train(copy.deepcopy(init), data, tmp_path, lr=lr, name="ga")
    assert buggy.trainer.model_accepts_loss_kwargs
    step1_ratio = norm_ratio(buggy.after[0], ref.after[0], p0)
    step1_scaled = update_rel(p0 + (ref.after[0] - p0) * K, buggy.after[0], p0)
    buggy_vs_ref = update_rel(buggy.after[-1], ref_final, p0)

    fixed_model = copy.deepcopy(init)
    fixed_model.accepts_loss_kwargs = False
    fixed = hf_train(fixed_model, data, tmp_path, lr=lr, name="fixed")
    assert not fixed.trainer.model_accepts_loss_kwargs
    fixed_vs_ref = update_rel(fixed.after[-1], ref_final, p0)

    print(f"\n[bert seq-cls, 22 ex, 2x4 vs one batch of 8] total-update rel diff vs the "
          f"Trainer's large batch: accumlab {ours_vs_ref:.3e}, Trainer GA=4 {buggy_vs_ref:.3e}, "
          f"Trainer GA=4 + accepts_loss_kwargs=False {fixed_vs_ref:.3e}; Trainer GA=4 step-1 "
          f"update / large batch = {step1_ratio:.6f} (x{K} vs it: rel diff {step1_scaled:.3e})")
    assert ours_vs_ref < 1e-4
    assert fixed_vs_ref < 1e-4
    assert step1_ratio == pytest.approx(K, rel=1e-4)  # the documented x GA factor
    assert step1_scaled < 1e-3  # rounding of p0 + small update, ~1e-5 measured
    assert buggy_vs_ref > 0.5
