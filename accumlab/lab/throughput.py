"""Throughput arithmetic and a measured micro-batch search: tokens/s, FLOPs per token, MFU.

A decoder's training step costs about

    6 N + 12 * layers * width * sequence   FLOPs per token

(N = parameters, tied embeddings counted once; the first term is the forward and backward
matrix multiplies, the second the attention scores, as in the PaLM paper's appendix B). MFU
(model FLOPs utilisation) divides achieved FLOP/s by the accelerator's dense peak.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import torch

from accumlab.engine.config import TrainConfig
from accumlab.engine.models import count_parameters
from accumlab.engine.trainer import train
from accumlab.lab.planner import free_memory

# Dense (no sparsity) peak FLOP/s of the 16-bit tensor cores, from the vendors' data sheets.
PEAK_BF16_FLOPS = {
    "H100": 989e12,  # SXM; the PCIe card is lower (756e12) but is matched by "H100 PCIe"
    "H100 PCIe": 756e12,
    "H200": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "A10G": 70e12,
    "T4": 65e12,  # fp16 (T4 has no bf16 tensor cores)
}


def model_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(parameters, layers, width) of a GPT-2- or BERT-style `transformers` model."""
    cfg = model.config
    layers = getattr(cfg, "n_layer", None) or cfg.num_hidden_layers
    width = getattr(cfg, "n_embd", None) or cfg.hidden_size
    return count_parameters(model), layers, width


def flops_per_token(n_params: int, layers: int, width: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 * layers * width * seq_len."""
    return 6.0 * n_params + 12.0 * layers * width * seq_len


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """`flops_per_token` for a model's own parameter count, depth and width."""
    return flops_per_token(*model_shape(model), seq_len)


def peak_flops(device_name: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name (the current CUDA device by default).

    None when the name is unknown or no GPU is present: report achieved FLOP/s instead of MFU.
    """
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    best = None
    for key, value in PEAK_BF16_FLOPS.items():  # the longest matching key wins ("H100 PCIe")
        if key in device_name and (best is None or len(key) > len(best[0])):
            best = (key, value)
    return best[1] if best else None


def mfu(tokens_per_s: float, flops_per_tok: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a known peak)."""
    if peak is None:
        return None
    return tokens_per_s * flops_per_tok / peak


def steady_tokens_per_s(history: Sequence[dict], skip: int = 1) -> float:
    """Median tokens/s of an `accumlab.train` history after `skip` warm-up steps."""
    rates = [r["tokens_per_s"] for r in history[skip:] if not r.get("skipped")]
    if not rates:
        raise ValueError(f"the history has {len(history)} steps: need more than skip={skip}")
    return statistics.median(rates)


def corpus_blocks(seq_len: int, n: int, split: str = "train") -> list[dict]:
    """`n` blocks of exactly `seq_len` tokens of the shipped corpus, cycled when it runs out.

    Packed blocks hold no padding, so every sequence costs the same: what throughput needs.
    """
    from accumlab.data.corpus import lm_examples
    from accumlab.data.packing import pack_examples
    from accumlab.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    need, limit = n * seq_len + seq_len, 64
    while True:  # tokenise only as much of the corpus as the run needs
        examples = lm_examples(tokenizer, split, max_length=max(seq_len, 8), limit=limit)
        if sum(len(e["input_ids"]) for e in examples) >= need or len(examples) < limit:
            break
        limit *= 4
    blocks = pack_examples(examples, seq_len)
    if not blocks:
        raise ValueError(f"the corpus split {split!r} holds fewer than {seq_len} tokens")
    return [blocks[i % len(blocks)] for i in range(n)]


def try_micro_batches(
    make_model: Callable[[], torch.nn.Module],
    data: Sequence,
    candidates: Sequence[int],
    *,
    steps: int = 3,
    precision: str = "fp32",
    device: str = "auto",
    compile: bool = False,
    budget_mb: float | None = None,
) -> list[dict]:
    """Train a few steps at each micro-batch size (k = 1) and measure it; stop at the first OOM.

    Returns one record per candidate tried, in increasing order: `micro_batch`, `fits`,
    `tokens_per_s` (median after the first step), `peak_memory_mb` (GPU memory on CUDA, the
    process's peak resident memory on CPU). A size over `budget_mb` counts as not fitting.
    """
    records = []
    for micro in sorted(candidates):
        if micro > len(data):
            break
        model = make_model()
        cfg = TrainConfig(micro_batch_size=micro, accum_steps=1, max_steps=steps,
                          precision=precision, device=device, compile=compile, shuffle=False,
                          progress=False)
        rec = {"micro_batch": micro, "fits": True}
        try:
            history = train(model, data, cfg).history
            rec["tokens_per_s"] = steady_tokens_per_s(history, skip=min(1, steps - 1))
            rec["peak_memory_mb"] = max(r["peak_memory_mb"] for r in history)
        except torch.OutOfMemoryError:  # accumlab's OutOfMemoryError is one too
            rec.update(fits=False, tokens_per_s=None, peak_memory_mb=None)
        del model
        free_memory()
        if rec["fits"] and budget_mb is not None and rec["peak_memory_mb"] > budget_mb:
            rec["fits"] = False
        records.append(rec)
        if not rec["fits"]:
            break  # larger micro-batches need more memory still
    return records


def fastest_fitting(records: Sequence[dict], divides: int | None = None,
                    ranks: int = 1) -> dict:
    """The record of `try_micro_batches` with the highest tokens/s among those that fit; with
    `divides`, only among micro-batches b for which b x ranks divides that many sequences, so
    that `accum_steps_for(divides, b, ranks)` gives exactly that effective batch."""
    fitting = [r for r in records if r["fits"]]
    if divides is not None:
        fitting = [r for r in fitting if divides % (r["micro_batch"] * ranks) == 0]
    if not fitting:
        raise ValueError("no micro-batch fitted" + (f" that divides {divides} sequences" if
                                                    divides is not None else "")
                         + ": try smaller candidates or a shorter sequence")
    return max(fitting, key=lambda r: r["tokens_per_s"])


def accum_steps_for(target_sequences: int, micro_batch: int, ranks: int = 1) -> int:
    """Accumulation steps k with micro_batch x k x ranks = `target_sequences` exactly.

    A micro-batch that does not divide the target gives no such k: the error names the
    effective batches the nearest k would give instead, so the choice stays the caller's.
    """
    if micro_batch < 1 or ranks < 1 or target_sequences < 1:
        raise ValueError("target_sequences, micro_batch and ranks must all be >= 1")
    per_step = micro_batch * ranks
    k, rest = divmod(target_sequences, per_step)
    if rest:
        nearest = (f"k = {k} or {k + 1} gives an effective batch of {k * per_step} or "
                   f"{(k + 1) * per_step}" if k else
                   f"one micro-batch already holds {per_step} sequences")
        raise ValueError(f"micro-batch {micro_batch} x {ranks} rank(s) does not divide "
                         f"{target_sequences} sequences: {nearest}; pick a micro-batch that "
                         "divides the target, or change the target")
    return k
