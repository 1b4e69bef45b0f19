"""The seed article's claims, computed: gradient statistics and small demonstrations (lesson 12).

Each function computes the answer to one of the seed's errors on this machine and returns plain
data; `accumlab.lab.errata_runs` holds the ones that train or time a model, and
`accumlab.ui.errata_figures` draws them. Notation: b micro-batch, k accumulation steps, R ranks,
B = b·k·R items per update.

- Claims 1-2: `gradient_distribution` samples many windows of k micro-batches of b examples
  (accumulated with `accumlab.engine.window.accumulate_gradients`) and as many single batches of
  b·k, and compares their mean and covariance with the exact G and Σ of the example pool
  (per-example gradients): E G_B = G, tr Cov(G_B) = tr Σ / B, E|G_B|² = |G|² + tr Σ / B
  (McCandlish et al. 2018, arXiv:1812.06162).
- FAQ: `spike_update_norms` (accumulation dilutes a gradient spike only by 1/k, clipping bounds
  it), `loss_by_generation_temperature`, `flops_per_token_by_batch`.
- Code: `one_hot_cross_entropy` (class indices are what cross-entropy takes), `import_error`.
- Claim 13: `zero_model_state_bytes` (ZeRO stages 1-3, Rajbhandari et al. 2019,
  arXiv:1910.02054) and `pipeline_bubble_fraction` (GPipe, Huang et al. 2019, arXiv:1811.06965).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from accumlab.engine.collate import pad_collate
from accumlab.engine.gradients import gradient_vector
from accumlab.engine.window import Accumulator, accumulate_gradients, default_forward
from accumlab.lab.memory.shapes import ModelShape
from accumlab.lab.noise import per_example_gradients

# Llama 2 7B's published config (Touvron et al. 2023, arXiv:2307.09288): 6.74B parameters.
LLAMA2_7B = ModelShape(layers=32, hidden=4096, heads=32, vocab=32000, positions=4096,
                       arch="llama", intermediate=11008, tied=False)

# Bytes per parameter of mixed-precision Adam training (ZeRO paper, section 3.1): 16-bit
# weights (2) and gradients (2), float32 master weights, momentum and variance (4 + 4 + 4 = K).
ZERO_WEIGHT_BYTES, ZERO_GRAD_BYTES, ZERO_OPTIMIZER_BYTES = 2, 2, 12


# ---------------------------------------------------------------- claims 1 and 2: G_B's law


def exact_gradient_moments(model: torch.nn.Module, examples: Sequence[dict], *,
                           task: str = "classification") -> dict:
    """The pool's mean gradient G, tr Σ and |G|² from per-example gradients (float64).

    Σ is the covariance of one example drawn uniformly from `examples`, so a batch of B examples
    drawn with replacement has E G_B = G and Cov G_B = Σ / B exactly. Dropout must be off.
    """
    grads, counts = per_example_gradients(model, examples, task=task)
    if not torch.all(counts == 1):
        raise ValueError("every example must be one loss item: use a classification model")
    mean = grads.mean(dim=0)
    centred = grads - mean
    direction = mean / mean.norm()
    return {"mean": mean, "grad_sq": float(mean.pow(2).sum()),
            "trace_sigma": float(centred.pow(2).sum(dim=1).mean()),
            "direction": direction,
            "var_along_direction": float((centred @ direction).pow(2).mean()),
            "items": len(examples)}


def window_gradient_samples(model: torch.nn.Module, examples: Sequence[dict], micro_batch: int,
                            accum_steps: int, windows: int, *, seed: int = 0,
                            task: str = "classification", pad_token_id: int = 1,
                            direction: torch.Tensor | None = None) -> dict:
    """Accumulate `windows` windows of k = `accum_steps` micro-batches of b = `micro_batch`
    examples, each drawn uniformly with replacement from `examples`, at fixed parameters.

    Returns the window gradients' mean vector, E|G_B|² (`mean_sq`), the unbiased total variance
    tr Cov G_B (`variance`), each window's |G_B|² (`sq_norms`) and, given a unit `direction`,
    each window gradient's component along it (`along`). Vectors are not kept (memory).
    """
    if micro_batch < 1 or accum_steps < 1 or windows < 2:
        raise ValueError("micro_batch and accum_steps must be >= 1 and windows >= 2, got "
                         f"{micro_batch}, {accum_steps}, {windows}")
    rng = random.Random(seed)
    net = copy.deepcopy(model)
    total, sq_norms, along = None, [], []
    for _ in range(windows):
        micro = [pad_collate([examples[rng.randrange(len(examples))] for _ in range(micro_batch)],
                             pad_token_id) for _ in range(accum_steps)]
        net.zero_grad(set_to_none=True)
        accumulate_gradients(net, micro, task=task)
        g = gradient_vector(net).double()
        total = g.clone() if total is None else total + g
        sq_norms.append(float(g.pow(2).sum()))
        if direction is not None:
            along.append(float(g @ direction))
    mean = total / windows
    mean_sq = sum(sq_norms) / windows
    variance = (mean_sq - float(mean.pow(2).sum())) * windows / (windows - 1)
    return {"micro_batch": micro_batch, "accum_steps": accum_steps,
            "batch": micro_batch * accum_steps, "windows": windows, "mean": mean,
            "mean_sq": mean_sq, "variance": variance, "sq_norms": sq_norms, "along": along}


def gradient_distribution(model: torch.nn.Module, examples: Sequence[dict], micro_batch: int,
                          ks: Sequence[int], windows: int, *, seed: int = 0,
                          task: str = "classification", pad_token_id: int = 1) -> dict:
    """For each k: windows of k micro-batches of b, and single batches of B = b·k, against the
    exact moments of the pool.

    Returns `truth` (`exact_gradient_moments` without the vectors) and one row per k with the
    measured mean-square norm and total variance of both, their predictions
    |G|² + tr Σ / B and tr Σ / B, and `mean_gap_ratio`: |mean_acc − mean_one|² divided by its
    expectation 2 tr Σ / (B · windows) when both have the same law (about 1; far above 1 means
    different means). `samples` keeps the raw per-window numbers for plots.
    """
    truth = exact_gradient_moments(model, examples, task=task)
    rows, samples = [], {}
    for i, k in enumerate(ks):
        common = dict(task=task, pad_token_id=pad_token_id, direction=truth["direction"])
        acc = window_gradient_samples(model, examples, micro_batch, k, windows,
                                      seed=seed + 2 * i, **common)
        one = window_gradient_samples(model, examples, micro_batch * k, 1, windows,
                                      seed=seed + 2 * i + 1, **common)
        batch = micro_batch * k
        noise = truth["trace_sigma"] / batch
        gap = float((acc["mean"] - one["mean"]).pow(2).sum())
        rows.append({"k": k, "b": micro_batch, "B": batch,
                     "variance accumulated": acc["variance"], "variance one batch": one["variance"],
                     "variance predicted": noise,
                     "mean_sq accumulated": acc["mean_sq"], "mean_sq one batch": one["mean_sq"],
                     "mean_sq predicted": truth["grad_sq"] + noise,
                     "mean_gap_ratio": gap / (2 * noise / windows)})
        samples[k] = {"accumulated": acc, "one batch": one}
    moments = {key: v for key, v in truth.items() if key not in ("mean", "direction")}
    return {"truth": moments, "rows": rows, "samples": samples}


# ---------------------------------------------------------------- FAQ: spikes, temperature, FLOPs


def spike_update_norms(model: torch.nn.Module, micro_batches: Sequence[dict], *, spike: float,
                       clip: float, task: str = "causal_lm", lr: float = 1.0) -> dict:
    """Size of one SGD update when the first micro-batch's gradient is `spike` times too large.

    The spike is simulated by multiplying that micro-batch's share of the window loss by
    `spike`. For k = 1, 2, 4, ... up to len(micro_batches) (the spiked one always included) the
    window runs through `accumlab.engine.window.Accumulator` with SGD at `lr`, once without
    clipping and once with `clip_grad_norm=clip`; also the whole window without the spike.
    Returns {"normal": norm, "rows": [{k, unclipped, clipped}]}: norms of the parameter change.
    """
    def update_norm(batches, factor, clip_norm):
        net = copy.deepcopy(model)
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        opt = torch.optim.SGD(net.parameters(), lr=lr)
        acc = Accumulator(net, opt, len(batches), task=task, clip_grad_norm=clip_norm)
        (window,) = list(acc.windows(batches))
        for j, batch in enumerate(window):
            loss = window.loss(default_forward(net, batch), batch["labels"])
            window.backward(loss * (factor if j == 0 else 1.0))
        window.step()
        after = torch.cat([p.detach().flatten() for p in net.parameters()])
        return float((after - before).norm())

    ks = [2**i for i in range(int(math.log2(len(micro_batches))) + 1)]
    rows = [{"k": k, "unclipped": update_norm(micro_batches[:k], spike, None),
             "clipped": update_norm(micro_batches[:k], spike, clip)} for k in ks]
    return {"normal": update_norm(micro_batches, 1.0, None), "clip": clip, "lr": lr,
            "spike": spike, "rows": rows}


@torch.no_grad()
def loss_by_generation_temperature(model: torch.nn.Module, batch: dict,
                                   temperatures: Sequence[float]) -> dict:
    """Teacher-forced training loss of a causal LM with its generation temperature set to each
    value, and the entropy (nats) of the next-token distribution sampling would use at it.

    The loss is `model(input_ids, labels=...).loss`, read with `generation_config.temperature`
    changed; the entropy is that of softmax(logits / T) at the last position, averaged over rows.
    """
    net = copy.deepcopy(model).eval()
    rows = []
    for t in temperatures:
        if t <= 0:
            raise ValueError(f"temperatures must be > 0, got {t}")
        net.generation_config.temperature = t
        out = net(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                  labels=batch["labels"])
        probs = torch.softmax(out.logits[:, -1].double() / t, dim=-1)
        entropy = float(-(probs * probs.clamp_min(1e-300).log()).sum(-1).mean())
        rows.append({"temperature": t, "training loss": float(out.loss),
                     "sampling entropy": entropy})
    return {"rows": rows}


def flops_per_token_by_batch(model: torch.nn.Module, seq_len: int, batch_sizes: Sequence[int],
                             *, seed: int = 0) -> list[dict]:
    """FLOPs of one training step (forward + backward of the LM loss), counted by PyTorch's
    `FlopCounterMode` (matrix multiplies and attention), divided by the tokens in the batch."""
    from torch.utils.flop_counter import FlopCounterMode

    net = copy.deepcopy(model)
    vocab = net.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in batch_sizes:
        ids = torch.randint(0, vocab, (b, seq_len), generator=g)
        net.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as counter:
            net(input_ids=ids, labels=ids).loss.backward()
        flops = counter.get_total_flops()
        rows.append({"batch": b, "tokens": b * seq_len, "flops": flops,
                     "flops per token": flops / (b * seq_len)})
    return rows


# ---------------------------------------------------------------- the seed's code, 11(f) and 11(h)


def one_hot_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy written with one-hot targets: −Σ_c onehot(y)_c log softmax(z)_c.

    `labels` are class indices (any shape with one index per row, e.g. the seed's (batch, 1));
    it equals `F.cross_entropy(logits, labels)`, which takes the indices directly.
    """
    labels = labels.reshape(-1)
    one_hot = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    return -(one_hot * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def import_error(module: str, name: str) -> str | None:
    """The message of the error that `from module import name` raises here, or None."""
    if not (all(part.isidentifier() for part in module.split(".")) and name.isidentifier()):
        raise ValueError(f"not a module and a name: {module!r}, {name!r}")
    try:
        exec(f"from {module} import {name}", {})  # the statement itself, as a user writes it
    except ImportError as error:
        return f"{type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------- claim 13: how big models train


def zero_model_state_bytes(n_params: int, ranks: int) -> dict[str, float]:
    """Model-state bytes per rank of mixed-precision Adam under data parallelism (`baseline`,
    everything replicated) and ZeRO stages 1-3 (`zero1` shards optimizer states, `zero2` also
    gradients, `zero3` also weights), from the ZeRO paper: (2 + 2 + 12)Ψ, 4Ψ + 12Ψ/R,
    2Ψ + 14Ψ/R, 16Ψ/R for Ψ parameters on R ranks. Activations are not included."""
    if n_params < 1 or ranks < 1:
        raise ValueError(f"n_params and ranks must be >= 1, got {n_params}, {ranks}")
    w, g, o = ZERO_WEIGHT_BYTES, ZERO_GRAD_BYTES, ZERO_OPTIMIZER_BYTES
    n = float(n_params)
    return {"baseline": (w + g + o) * n, "zero1": (w + g) * n + o * n / ranks,
            "zero2": w * n + (g + o) * n / ranks, "zero3": (w + g + o) * n / ranks}


def pipeline_bubble_fraction(stages: int, micro_batches: int) -> float:
    """Idle share of a GPipe step: (p − 1) / (m + p − 1) for p stages and m micro-batches.

    Each stage works m slots of a step that lasts m + p − 1 slots (the pipeline fills and
    drains), so more micro-batches per step (pipeline accumulation) shrink the bubble.
    """
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages and micro_batches must be >= 1, got {stages}, {micro_batches}")
    return (stages - 1) / (micro_batches + stages - 1)


__all__ = ["LLAMA2_7B", "exact_gradient_moments", "flops_per_token_by_batch",
           "gradient_distribution", "import_error", "loss_by_generation_temperature",
           "one_hot_cross_entropy", "pipeline_bubble_fraction", "spike_update_norms",
           "window_gradient_samples", "zero_model_state_bytes"]
