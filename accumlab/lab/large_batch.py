"""Large-batch experiments behind notebook 06: the critical batch size and learning-rate scaling.

McCandlish et al. 2018 (arXiv:1812.06162) predict, for a batch of B items and a noise scale
B_noise, the optimizer steps S and the items processed E = B·S needed to reach a given loss:

    S / S_min = 1 + B_noise / B,    E / E_min = 1 + B / B_noise,
    so (S / S_min − 1)(E / E_min − 1) = 1.

Below B_noise doubling the batch nearly halves the steps (perfect scaling); around it the
gain shrinks (diminishing returns); far above it a larger batch buys no fewer steps, only more
data (Shallue et al. 2018). `critical_batch_runs` measures S and E for several batch sizes on
a real model, `fit_tradeoff` fits S_min and B_crit from them, and `lr_scaling_runs` trains one
large batch with the learning rate unscaled, square-root scaled and linearly scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from accumlab.engine.config import TrainConfig
from accumlab.engine.models import make_model
from accumlab.engine.schedules import scaled_lr
from accumlab.engine.trainer import StopTraining, train

# Published batch sizes of large language models (from the papers; see the notebook's sources).
LLM_BATCH_PRACTICE = (
    {"model": "GPT-3 125M", "batch_tokens": 0.5e6, "seq_len": 2048, "peak_lr": 6e-4,
     "ramp": "batch ramped linearly from 32k tokens over the first 4-12B tokens",
     "source": "Brown et al. 2020 (2005.14165)"},
    {"model": "GPT-3 175B", "batch_tokens": 3.2e6, "seq_len": 2048, "peak_lr": 0.6e-4,
     "ramp": "same ramp; LR warmup over 375M tokens, cosine to 10%",
     "source": "Brown et al. 2020 (2005.14165)"},
    {"model": "LLaMA", "batch_tokens": 4e6, "seq_len": 2048, "peak_lr": None,
     "ramp": "no batch ramp; 2000 warmup steps, AdamW beta2 0.95, clip 1.0",
     "source": "Touvron et al. 2023 (2302.13971)"},
    {"model": "Llama 3 405B", "batch_tokens": 16e6, "seq_len": 8192, "peak_lr": None,
     "ramp": "4M tokens (seq 4096) -> 8M (seq 8192) after 252M tokens -> 16M after 2.87T",
     "source": "Grattafiori et al. 2024 (2407.21783)"},
)


def steps_factor(batch: float, noise_scale: float) -> float:
    """S / S_min = 1 + B_noise / B: optimizer steps relative to an infinite batch."""
    return 1.0 + noise_scale / batch


def examples_factor(batch: float, noise_scale: float) -> float:
    """E / E_min = 1 + B / B_noise: data processed relative to a tiny batch."""
    return 1.0 + batch / noise_scale


def regime(batch: float, noise_scale: float) -> str:
    """"perfect scaling" (B ≤ B_noise/10), "no returns" (B ≥ 10 B_noise) or "diminishing
    returns" in between: what a larger batch buys in steps."""
    ratio = batch / noise_scale
    if ratio <= 0.1:
        return "perfect scaling"
    if ratio >= 10:
        return "no returns"
    return "diminishing returns"


def regime_table(ratios: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0)) -> list[dict]:
    """Rows of B / B_noise with McCandlish's S/S_min, E/E_min and the regime."""
    return [{"B/B_noise": r, "S/S_min": steps_factor(r, 1.0), "E/E_min": examples_factor(r, 1.0),
             "regime": regime(r, 1.0)} for r in ratios]


def crossing(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """First x where y falls to `target`, linearly interpolated in `points` [(x, y), ...]."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y0 > target >= y1:
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    if points and points[0][1] <= target:
        return points[0][0]
    return None


class _StopAtTarget:
    """Callback: stop training once the evaluated loss reaches the target."""

    def __init__(self, target: float):
        self.target = target

    def on_step_end(self, entry: dict) -> None:
        if "eval" in entry and entry["eval"]["loss"] <= self.target:
            raise StopTraining


def _split(batch: int, max_micro: int, accum: int = 8) -> tuple[int, int]:
    """(micro_batch_size, accum_steps) for `batch` sequences: up to `accum` micro-batches (at
    least 2: the noise scale needs two sizes, and a window 8 times its first micro-batch
    measures it better than one twice as large) of at most `max_micro` sequences."""
    if batch < 2:
        raise ValueError(f"batch must be >= 2 sequences (two micro-batches), got {batch}")
    micro = min(max_micro, max(1, batch // accum), batch // 2)
    while batch % micro:
        micro -= 1
    return micro, batch // micro


def train_to_target(examples: Sequence[dict], eval_examples: Sequence[dict], batch: int, *,
                    target_loss: float, lr: float, max_steps: int, eval_every_sequences: int = 32,
                    max_micro: int = 16, warmup_steps: int = 0, model_size: str = "tiny",
                    seed: int = 0, callbacks: Sequence = (), stop_at_target: bool = True) -> dict:
    """Train a fresh GPT-2 with `batch` sequences per step until the eval loss ≤ target (or for
    `max_steps` whatever the loss, with ``stop_at_target=False``).

    The held-out loss is measured about every `eval_every_sequences` training sequences; the
    step and token count where it first crosses the target are interpolated between
    evaluations. Records the noise scale in every history record. Returns plain data, with
    the largest held-out loss (`max_eval_loss`, at step `max_eval_step`) and the largest rise
    between two evaluations in a row (`largest_rise`: a loss spike if positive).
    """
    micro, accum = _split(batch, max_micro)
    longest = max(len(e["input_ids"]) for e in [*examples, *eval_examples])
    model = make_model("gpt2", model_size, seed=seed, max_positions=max(longest, 8))
    every = max(1, eval_every_sequences // batch)
    config = TrainConfig(micro_batch_size=micro, accum_steps=accum, max_steps=max_steps, lr=lr,
                         warmup_steps=warmup_steps, eval_every=every, noise_scale=True,
                         eval_batch_size=min(64, len(eval_examples)),
                         seed=seed, device="cpu", progress=False)
    stop = [_StopAtTarget(target_loss)] if stop_at_target else []
    result = train(model, examples, config, eval_data=eval_examples,
                   callbacks=[*callbacks, *stop])
    history = result.history
    tokens, cumulative = 0, [(0, 0)]
    for r in history:
        tokens += r["tokens"]
        cumulative.append((r["step"], tokens))
    evals = [(r["step"], r["eval"]["loss"]) for r in history if "eval" in r]
    steps = crossing(evals, target_loss)
    tokens_at = None
    if steps is not None:
        lo = max(s for s, _ in cumulative if s <= steps)
        hi = min((s for s, _ in cumulative if s >= steps), default=lo)
        t_lo, t_hi = dict(cumulative)[lo], dict(cumulative)[hi]
        tokens_at = t_lo + (t_hi - t_lo) * ((steps - lo) / (hi - lo) if hi > lo else 0.0)
    noise = [r["noise_scale"] for r in history if math.isfinite(r.get("noise_scale", math.nan))]
    return {"batch": batch, "micro_batch_size": micro, "accum_steps": accum, "lr": lr,
            "reached": steps is not None, "steps": steps, "tokens": tokens_at,
            "sequences": steps * batch if steps is not None else None,
            "noise_scale_tokens": noise[-1] if noise else math.nan,
            "mean_length": sum(len(e["input_ids"]) for e in examples) / len(examples),
            "history": history, "evals": evals,
            "max_eval_loss": max(v for _, v in evals), "max_eval_step": max(evals, key=lambda e: e[1])[0],
            "largest_rise": max((b - a for (_, a), (_, b) in zip(evals, evals[1:])),
                                default=math.nan)}


def critical_batch_runs(examples: Sequence[dict], eval_examples: Sequence[dict],
                        batches: Sequence[int], *, target_loss: float, base_lr: float,
                        base_batch: int, lr_scaling: str = "sqrt", max_sequences: int = 4096,
                        on_run: Callable[[int], Sequence] | None = None, **kwargs) -> list[dict]:
    """`train_to_target` for each batch size (sequences), the LR scaled from `base_lr` at
    `base_batch` by `lr_scaling`. A run stops at the target or after `max_sequences`.

    `on_run(batch)` may return callbacks for that run (e.g. a live plot named after it).
    """
    runs = []
    for batch in batches:
        lr = scaled_lr(base_lr, batch, base_batch, lr_scaling)
        callbacks = on_run(batch) if on_run else ()
        runs.append(train_to_target(examples, eval_examples, batch, target_loss=target_loss,
                                    lr=lr, max_steps=max(2, max_sequences // batch),
                                    callbacks=callbacks, **kwargs))
    return runs


def fit_tradeoff(runs: Sequence[dict]) -> dict:
    """Least-squares fit of S = S_min (1 + B_crit / B) to the runs that reached the target.

    S is linear in 1/B: the intercept is S_min, the slope S_min · B_crit. Also returns
    E_min = S_min · B_crit (in sequences). NaN when fewer than two runs reached the target or
    the fit is not positive.
    """
    pts = [(1.0 / r["batch"], r["steps"]) for r in runs if r["reached"]]
    nan = {"S_min": math.nan, "B_crit": math.nan, "E_min": math.nan}
    if len(pts) < 2:
        return nan
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return nan
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    intercept = my - slope * mx
    if intercept <= 0 or slope <= 0:
        return nan
    b_crit = slope / intercept
    return {"S_min": intercept, "B_crit": b_crit, "E_min": intercept * b_crit}


def tradeoff_curve(s_min: float, e_min: float, points: int = 50) -> tuple[list, list]:
    """(steps, sequences) along McCandlish's curve (S/S_min − 1)(E/E_min − 1) = 1."""
    ratios = [10 ** (-2 + 4 * i / (points - 1)) for i in range(points)]  # B / B_crit
    steps = [s_min * steps_factor(r, 1.0) for r in ratios]
    data = [e_min * examples_factor(r, 1.0) for r in ratios]
    return steps, data


def rule_run(examples: Sequence[dict], eval_examples: Sequence[dict], batch: int, rule: str, *,
             base_lr: float, base_batch: int, target_loss: float, max_steps: int,
             warmup_steps: int = 0, **kwargs) -> dict:
    """`train_to_target` at `batch` with the LR of `base_batch` scaled by `rule`: "none",
    "sqrt" or "linear", optionally with "+warmup" (e.g. "linear+warmup"), which warms the LR
    up over `warmup_steps` optimizer steps. The run carries its `rule`."""
    name, _, extra = rule.partition("+")
    if name not in ("none", "sqrt", "linear") or extra not in ("", "warmup"):
        raise ValueError(f"unknown rule {rule!r}: use none, sqrt or linear, optionally "
                         "followed by '+warmup'")
    lr = scaled_lr(base_lr, batch, base_batch, name)
    run = train_to_target(examples, eval_examples, batch, target_loss=target_loss, lr=lr,
                          max_steps=max_steps, warmup_steps=warmup_steps if extra else 0,
                          **kwargs)
    run["rule"] = rule
    return run


def lr_scaling_runs(examples: Sequence[dict], eval_examples: Sequence[dict], batch: int, *,
                    base_lr: float, base_batch: int, target_loss: float, max_steps: int,
                    rules: Sequence[str] = ("none", "sqrt", "linear"), warmup_steps: int = 0,
                    on_run: Callable[[str], Sequence] | None = None, **kwargs) -> list[dict]:
    """`rule_run` for each rule at the same `batch` (sequences per optimizer step).

    `on_run(rule)` may return callbacks for that run.
    """
    return [rule_run(examples, eval_examples, batch, rule, base_lr=base_lr,
                     base_batch=base_batch, target_loss=target_loss, max_steps=max_steps,
                     warmup_steps=warmup_steps, callbacks=on_run(rule) if on_run else (),
                     **kwargs) for rule in rules]


def unigram_loss(examples: Sequence[dict], eval_examples: Sequence[dict]) -> float:
    """Held-out loss (nats per label token) of the best model without context: every next
    token predicted from its frequency in `examples` (add-½ smoothing over the ids seen in
    either set). A language model that has learnt only the token frequencies sits here."""
    counts: dict[int, int] = {}
    for e in examples:
        for t in e["input_ids"][1:]:
            counts[t] = counts.get(t, 0) + 1
    targets = [t for e in eval_examples for t in e["input_ids"][1:]]
    vocab = len(set(counts) | set(targets))
    total = sum(counts.values()) + 0.5 * vocab
    return -sum(math.log((counts.get(t, 0) + 0.5) / total) for t in targets) / len(targets)


def run_regime(run: dict) -> dict:
    """Where a run's batch sits against its own live noise scale (both in tokens): the batch
    in tokens, the ratio B / B_noise, and the regime it names (NaN / "unknown" if the noise
    scale was not estimable)."""
    batch_tokens = run["batch"] * run["mean_length"]
    noise = run["noise_scale_tokens"]
    if not (math.isfinite(noise) and noise > 0):
        return {"batch_tokens": batch_tokens, "ratio": math.nan, "regime": "unknown"}
    return {"batch_tokens": batch_tokens, "ratio": batch_tokens / noise,
            "regime": regime(batch_tokens, noise)}


__all__ = ["LLM_BATCH_PRACTICE", "critical_batch_runs", "crossing", "examples_factor",
           "fit_tradeoff", "lr_scaling_runs", "regime", "regime_table", "rule_run", "run_regime",
           "unigram_loss",
           "steps_factor", "tradeoff_curve", "train_to_target"]
