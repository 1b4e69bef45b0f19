"""Training memory: an analytic model, a measurement helper and an accumulation planner.

The analytic model adds up what a training step of a GPT-2-style decoder keeps in memory:

- model states: weights, gradients and optimizer states. AdamW keeps two states per
  parameter, so fp32 or mixed-precision training holds about 16 bytes per parameter
  (Rajbhandari et al. 2019, "ZeRO");
- activations saved for backward, per layer ``s*b*h*(34 + 5*a*s/h)`` bytes in 16-bit with
  dropout (Korthikanti et al. 2022): they grow with micro-batch b times sequence length s, and
  the ``a*s*s*b`` attention-score part disappears with fused (flash) attention;
- logits and their loss buffers, ``b*s*V`` elements several times over.

Accumulation changes only the last two: they depend on the micro-batch, the states do not.
This is the textbook count for pure 16-bit kernels. Real PyTorch autocast training keeps more
(the residual stream and LayerNorms in float32, GELUs built from several saved operations,
float32 copies of the logits for the loss), so measure: `measure_training_memory` measures one
real step, and `fit_linear` turns a few measured micro-batches into a prediction for the rest.
`predict_memory` is the model to plan with: `activation_ledger` lists, tensor by tensor, what
PyTorch eager training of GPT-2, BERT and Llama (`transformers`) saves for backward, including
autocast's copies, activation checkpointing and a chunked loss; `measure_peak_memory` measures
the true peak of live tensors of one training window on CPU (profiler memory events) or CUDA.
No plotting or widget code lives here.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

GIB = 2**30
MIB = 2**20

# bytes per element of the forward pass's compute dtype
COMPUTE_BYTES = {"fp64": 8, "fp32": 4, "bf16": 2, "fp16": 2}
# bytes per parameter of the master weights (and so of the accumulated gradients)
MASTER_BYTES = {"fp64": 8, "fp32": 4, "bf16": 4, "fp16": 4}
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0, "sgd_momentum": 1}

# Reference measurements on one H100 80GB (not computed by the notebooks; quote them as such).
# GPT-2 small (124M), sequence 1024, bf16 autocast over float32 weights, fused AdamW, PyTorch
# eager mode (no torch.compile) with transformers' default attention (SDPA, a fused kernel):
# peak torch.cuda.max_memory_allocated in GiB per micro-batch; micro-batch 64 runs out of memory.
REFERENCE_H100_GPT2_SMALL = {
    "description": "one H100 80GB, GPT-2 small, sequence 1024, bf16 autocast, eager mode "
                   "(no torch.compile), default SDPA attention",
    "size": "gpt2-small",
    "seq_len": 1024,
    "precision": "bf16",
    "attention": "fused",
    "gpu_gib": 80,
    "peak_gib": {1: 3.5, 4: 7.6, 8: 13.0, 16: 23.8, 32: 45.5},
    "out_of_memory": (64,),
}
# The same setting measured once more on one H100 with one `accumlab.train` step (torch 2.11,
# transformers 5.17), with SDPA and with eager attention (which stores the s x s scores).
REFERENCE_H100_ATTENTION = {
    "description": "one H100 80GB, GPT-2 small, sequence 1024, bf16, one accumlab.train step",
    "sdpa": {1: 2.19, 4: 7.03, 8: 12.83, 16: 24.42, 32: 47.61},
    "eager": {1: 3.53, 4: 10.26, 8: 19.29, 16: 37.35, 32: 73.46},
}


ARCHS = ("gpt2", "bert", "llama")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a transformer's training memory.

    `arch` is "gpt2" (pre-LayerNorm decoder, fused QKV, GELU), "bert" (post-LayerNorm encoder
    with a classification head, or an MLM head with `task="masked_lm"`) or "llama"
    (RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention with `kv_heads`).
    `intermediate` is the MLP width (default 4 x hidden); `tied` says whether the output
    layer shares the token embedding.
    """

    layers: int
    hidden: int
    heads: int
    vocab: int
    positions: int
    arch: str = "gpt2"
    kv_heads: int | None = None
    intermediate: int | None = None
    tied: bool = True
    task: str = "causal_lm"
    num_labels: int = 2

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
        if self.heads % self.kv_width_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def kv_width_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def ffn(self) -> int:
        """Width of the MLP's hidden layer."""
        return self.intermediate or 4 * self.hidden

    @property
    def kv_dim(self) -> int:
        """Width of the key (and of the value) projection: kv_heads x head size."""
        return self.kv_width_heads * (self.hidden // self.heads)

    @property
    def has_lm_head(self) -> bool:
        """Whether the model computes vocabulary logits (and so a large loss)."""
        return self.task in ("causal_lm", "masked_lm")

    @classmethod
    def gpt2(cls, size: str = "tiny", vocab: int | None = None,
             positions: int | None = None) -> ModelShape:
        """The shape `accumlab.models.make_model("gpt2", size)` builds (same defaults)."""
        from .models import DEFAULT_VOCAB, SIZES

        if size not in SIZES:
            raise ValueError(f"unknown model size {size!r}: choose one of {list(SIZES)}")
        layers, hidden, heads = SIZES[size]
        if vocab is None:
            vocab = 50257 if size == "gpt2-small" else DEFAULT_VOCAB
        if positions is None:
            positions = 1024 if size == "gpt2-small" else 256
        return cls(layers, hidden, heads, vocab, positions)

    @classmethod
    def named(cls, name: str) -> ModelShape:
        """A shape by name: accumlab's sizes ("tiny" ... "gpt2-small") or a public model."""
        if name in NAMED_SHAPES:
            return cls(**NAMED_SHAPES[name])
        from .models import SIZES

        if name in SIZES:
            return cls.gpt2(name)
        raise ValueError(f"unknown model {name!r}: choose one of {model_names()}, or pass a "
                         "transformers config (ModelShape.from_config)")

    @classmethod
    def from_config(cls, config, task: str | None = None) -> ModelShape:
        """The shape of a `transformers` GPT2Config, BertConfig or LlamaConfig (or Mistral)."""
        kind = getattr(config, "model_type", None)
        tied = bool(getattr(config, "tie_word_embeddings", True))
        if kind == "gpt2":
            return cls(config.n_layer, config.n_embd, config.n_head, config.vocab_size,
                       config.n_positions, "gpt2", intermediate=config.n_inner, tied=tied,
                       task=task or "causal_lm")
        if kind == "bert":
            return cls(config.num_hidden_layers, config.hidden_size,
                       config.num_attention_heads, config.vocab_size,
                       config.max_position_embeddings, "bert",
                       intermediate=config.intermediate_size, task=task or "classification",
                       num_labels=config.num_labels)
        if kind in ("llama", "mistral"):
            return cls(config.num_hidden_layers, config.hidden_size,
                       config.num_attention_heads, config.vocab_size,
                       config.max_position_embeddings, "llama",
                       kv_heads=config.num_key_value_heads,
                       intermediate=config.intermediate_size, tied=tied,
                       task=task or "causal_lm")
        raise ValueError(f"no memory model for model_type={kind!r}: gpt2, bert, llama and "
                         "mistral configs are supported")

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ModelShape:
        """The shape of a built `transformers` model (task from `losses.detect_task`)."""
        from .losses import detect_task

        return cls.from_config(model.config, task=detect_task(model))

    @property
    def parameters(self) -> int:
        """Exact parameter count of the `transformers` model of this shape.

        GPT-2 per layer: 12h^2 + 13h with the usual 4h MLP (QKV, projection, two MLP
        matrices, biases, two LayerNorms), plus token and position embeddings and the final
        LayerNorm. BERT has the same layer, post-norm, plus token-type embeddings and its head.
        Llama per layer: 2h^2 + 2h*kv_dim + 3h*ffn + 2h (no biases, RMSNorm weights only).
        """
        h, i, v = self.hidden, self.ffn, self.vocab
        head = 0 if self.tied else v * h
        if self.arch == "llama":
            layer = 2 * h * h + 2 * h * self.kv_dim + 3 * h * i + 2 * h
            return self.layers * layer + v * h + h + head
        layer = 4 * h * h + 2 * h * i + 9 * h + i  # attention, MLP and two LayerNorms
        if self.arch == "gpt2":
            return self.layers * layer + (v + self.positions) * h + 2 * h + head
        embeddings = (v + self.positions + 2) * h + 2 * h
        if self.task == "masked_lm":
            top = h * h + h + 2 * h + v  # transform dense, LayerNorm, decoder bias (tied)
        else:
            top = h * h + h + h * self.num_labels + self.num_labels  # pooler, classifier
        return self.layers * layer + embeddings + top

    def to_dict(self) -> dict:
        return asdict(self)


# Public models by name (their published configs), for `accumlab plan --model NAME`.
NAMED_SHAPES = {
    "gpt2-medium": dict(layers=24, hidden=1024, heads=16, vocab=50257, positions=1024),
    "gpt2-large": dict(layers=36, hidden=1280, heads=20, vocab=50257, positions=1024),
    "gpt2-xl": dict(layers=48, hidden=1600, heads=25, vocab=50257, positions=1024),
    "bert-base": dict(layers=12, hidden=768, heads=12, vocab=30522, positions=512,
                      arch="bert", task="classification"),
    "bert-large": dict(layers=24, hidden=1024, heads=16, vocab=30522, positions=512,
                       arch="bert", task="classification"),
    "tinyllama-1.1b": dict(layers=22, hidden=2048, heads=32, vocab=32000, positions=2048,
                           arch="llama", kv_heads=4, intermediate=5632, tied=False),
    "llama-3.2-1b": dict(layers=16, hidden=2048, heads=32, vocab=128256, positions=131072,
                         arch="llama", kv_heads=8, intermediate=8192, tied=True),
    "llama-3.2-3b": dict(layers=28, hidden=3072, heads=24, vocab=128256, positions=131072,
                         arch="llama", kv_heads=8, intermediate=8192, tied=True),
    "llama-3.1-8b": dict(layers=32, hidden=4096, heads=32, vocab=128256, positions=131072,
                         arch="llama", kv_heads=8, intermediate=14336, tied=False),
}


def model_names() -> list[str]:
    """Every name `ModelShape.named` accepts."""
    from .models import SIZES

    return list(SIZES) + list(NAMED_SHAPES)


def _check_precision(precision: str) -> None:
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision must be one of {list(COMPUTE_BYTES)}, got {precision!r}")


def model_state_bytes(n_params: int, precision: str = "bf16", optimizer: str = "adamw"
                      ) -> dict[str, int]:
    """Bytes of weights, gradients and optimizer states for `n_params` parameters.

    fp32 and mixed precision (bf16/fp16 autocast over float32 master weights, as accumlab
    trains) both keep 4 + 4 + 8 = 16 bytes per parameter with AdamW; fp64 doubles it. Under
    autocast the forward also caches a 16-bit copy of the weights (2 bytes per parameter).
    """
    _check_precision(precision)
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")
    master = MASTER_BYTES[precision]
    return {
        "weights": n_params * master,
        "gradients": n_params * master,
        "optimizer": n_params * master * OPTIMIZER_STATES[optimizer],
        "weight_copies": n_params * COMPUTE_BYTES[precision] if precision in ("bf16", "fp16")
        else 0,
    }


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                     attention: str = "eager", dropout: bool = True) -> int:
    """Activations saved for backward by all layers (Korthikanti et al. 2022, Table 2).

    Per layer in 16-bit: ``s*b*h*34 + 5*a*s*s*b`` bytes with dropout (its 1-byte masks
    included); without dropout ``32*s*b*h + 2*a*s*s*b``. Fused attention (FlashAttention, SDPA)
    keeps no ``s*s`` scores. Other precisions scale with their element size.
    """
    _check_precision(precision)
    if attention not in ("eager", "fused"):
        raise ValueError(f"attention must be 'eager' or 'fused', got {attention!r}")
    s, b, h, a = seq_len, micro_batch, shape.hidden, shape.heads
    linear = 34 if dropout else 32
    scores = (5 if dropout else 2) if attention == "eager" else 0
    per_layer_16bit = s * b * h * linear + scores * a * s * s * b
    return shape.layers * per_layer_16bit * COMPUTE_BYTES[precision] // 2


def logits_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                 saved_only: bool = False) -> int:
    """Logits and loss buffers: ``b*s*V`` elements in the compute dtype, a float32 copy for the
    loss when that dtype is 16-bit, and a float32 (or wider) gradient of the logits.

    With `saved_only` only what the loss saves for backward (its log-probabilities, one
    ``b*s*V`` tensor at float32 or wider) is counted, to compare with `saved_activation_bytes`.
    """
    _check_precision(precision)
    e = COMPUTE_BYTES[precision]
    per_element = max(4, e) if saved_only else e + (4 if e < 4 else 0) + max(4, e)
    return micro_batch * seq_len * shape.vocab * per_element


def _check_sizes(shape: ModelShape, micro_batch: int, seq_len: int) -> None:
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    if seq_len > shape.positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {shape.positions} "
                         "positions")


def estimate_memory(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                    optimizer: str = "adamw", attention: str = "eager", dropout: bool = True
                    ) -> dict:
    """Every component of one training step's memory, in bytes, and their `total`."""
    _check_sizes(shape, micro_batch, seq_len)
    parts = model_state_bytes(shape.parameters, precision, optimizer)
    parts["activations"] = activation_bytes(shape, micro_batch, seq_len, precision, attention,
                                            dropout)
    parts["logits"] = logits_bytes(shape, micro_batch, seq_len, precision)
    return {
        "micro_batch": micro_batch, "seq_len": seq_len, "precision": precision,
        "parameters": shape.parameters, **parts, "total": sum(parts.values()),
    }


def memory_sweep(shape: ModelShape, micro_batches, seq_len: int, precision: str = "bf16",
                 **kwargs) -> list[dict]:
    """`estimate_memory` for several micro-batch sizes (plain records, ready to plot)."""
    return [estimate_memory(shape, b, seq_len, precision, **kwargs) for b in micro_batches]


def largest_micro_batch(shape: ModelShape, seq_len: int, budget_bytes: float,
                        precision: str = "bf16", limit: int = 4096, **kwargs) -> int:
    """The largest micro-batch whose estimate fits in `budget_bytes` (0 if none does)."""
    lo, hi = 0, limit
    while lo < hi:  # total memory grows with the micro-batch: bisect
        mid = (lo + hi + 1) // 2
        if estimate_memory(shape, mid, seq_len, precision, **kwargs)["total"] <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_accumulation(target_batch: int, max_micro_batch: int, ranks: int = 1) -> dict:
    """Split a target effective batch into micro-batch x accumulation steps x ranks exactly.

    The micro-batch is the largest divisor of ``target_batch / ranks`` that fits under
    `max_micro_batch`, so that the effective batch is the target itself.
    """
    if target_batch < 1 or max_micro_batch < 1 or ranks < 1:
        raise ValueError("target_batch, max_micro_batch and ranks must all be >= 1")
    if target_batch % ranks:
        raise ValueError(f"target_batch={target_batch} is not a multiple of ranks={ranks}")
    per_rank = target_batch // ranks
    micro = max(d for d in range(1, min(per_rank, max_micro_batch) + 1) if per_rank % d == 0)
    steps = per_rank // micro
    return {"micro_batch": micro, "accum_steps": steps, "ranks": ranks,
            "effective_batch": micro * steps * ranks}


def fit_linear(micro_batches, peaks) -> dict:
    """Least-squares line ``peak = fixed + per_sequence * micro_batch`` through measurements.

    Peak memory is linear in the micro-batch (activations and logits scale with it, the model
    states do not), so two or three measured micro-batches predict the rest. Returns the two
    coefficients and the largest relative residual of the fit.
    """
    xs, ys = [float(x) for x in micro_batches], [float(y) for y in peaks]
    if len(xs) < 2 or len(set(xs)) < 2:
        raise ValueError("need measurements at two or more different micro-batch sizes")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    fixed = my - slope * mx
    worst = max(abs(fixed + slope * x - y) / abs(y) for x, y in zip(xs, ys, strict=True))
    return {"fixed": fixed, "per_sequence": slope, "max_relative_residual": worst}


def largest_fitting(fit: dict, budget: float) -> int:
    """The largest micro-batch whose fitted peak (same unit as `budget`) fits the budget."""
    if fit["per_sequence"] <= 0:
        raise ValueError("the fitted memory does not grow with the micro-batch")
    return max(0, math.floor((budget - fit["fixed"]) / fit["per_sequence"]))


# ---------------------------------------------------------------- what PyTorch really keeps
#
# The textbook count above assumes pure 16-bit kernels. `activation_ledger` lists instead the
# tensors that PyTorch's autograd saves for backward in eager mode, for the `transformers`
# implementations of GPT-2, BERT and Llama, one row per tensor (checked tensor by tensor
# against `saved_activation_bytes` on CPU in float32). Under bf16/fp16 autocast it follows
# CUDA's autocast policy: matmuls save a 16-bit copy of their input (one copy per linear layer
# that reads a float32 tensor), LayerNorm/RMSNorm, softmax and `pow` run in float32, and the
# residual stream stays float32. `predict_memory` adds the model states and the loss.

ATTENTIONS = ("sdpa", "eager")
DEVICES = ("cuda", "cpu")


def _attention_name(attention: str) -> str:
    name = "sdpa" if attention in ("fused", "flash", "sdpa") else attention
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be 'sdpa' (fused kernels) or 'eager', got {attention!r}")
    return name


def activation_ledger(shape: ModelShape, seq_len: int, precision: str = "bf16",
                      attention: str = "sdpa", device: str = "cuda", dropout: float = 0.0
                      ) -> list[dict]:
    """The tensors one training step saves for backward, per token, by where they are kept.

    Each row has `tensor` (what it is), `bytes_per_token` (at this `seq_len`: attention
    probabilities grow with it) and `per_layer` (True: once per transformer layer; False:
    once per model, embeddings and head). Multiply by micro-batch x seq_len for bytes. The
    logits and the loss are not rows: see `loss_peak_bytes`.

    `device` matters for two kernel details: CPU's SDPA copies GPT-2's key and value, and
    16-bit autocast on CPU follows another op policy, which is not modelled (measure instead).
    """
    _check_precision(precision)
    attention = _attention_name(attention)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    autocast = precision in ("bf16", "fp16")
    if autocast and device == "cpu":
        raise ValueError("16-bit autocast on CPU follows another op policy and is not "
                         "modelled: use precision='fp32' on CPU, or measure the step with "
                         "measure_peak_memory")
    f = MASTER_BYTES[precision]  # residual stream, norms, softmax: float32 (or float64)
    c = COMPUTE_BYTES[precision]  # matmul inputs and outputs
    h, a, i, s = shape.hidden, shape.heads, shape.ffn, seq_len
    rows: list[dict] = []

    def add(tensor: str, nbytes: float, per_layer: bool = True) -> None:
        if nbytes:
            rows.append({"tensor": tensor, "bytes_per_token": nbytes, "per_layer": per_layer})

    def linear_inputs(readers: int) -> float:
        """A float32 tensor read by `readers` linear layers: saved once in fp32/fp64, but
        autocast makes (and saves) one 16-bit copy per reader."""
        return readers * h * c if autocast else h * c

    def attention_rows(qkv: str, qkv_width: int, copies: str, copies_width: int) -> None:
        """SDPA saves q, k, v and its output; eager attention saves copies of q, k, v for
        its matmuls and the s x s probabilities."""
        if attention == "sdpa":
            add(qkv, qkv_width * c)
            if device == "cpu" and shape.arch == "gpt2":  # views of the fused QKV output
                add("key and value copies made by CPU SDPA", 2 * h * c)
            add("attention output (input of the output projection)", h * c)
            add("attention softmax statistics (logsumexp)", a * 4)
        else:
            add(copies, copies_width * c)
            add("attention probabilities (softmax output)", a * s * f)
            if autocast:
                add("16-bit copy of the attention probabilities", a * s * c)
            if dropout:
                add("attention dropout mask and output", a * s * (1 + c))
            add("attention output (input of the output projection)", h * c)
        if dropout:
            add("residual dropout masks", 2 * h)

    if shape.arch == "gpt2":
        add("LayerNorm 1 input (residual stream)", h * f)
        add("QKV projection input", linear_inputs(1))
        attention_rows("query, key, value (one fused projection)", 3 * h,
                       "query, key and value copies for the matmuls", 3 * h)
        add("LayerNorm 2 input (residual stream)", h * f)
        add("MLP input", linear_inputs(1))
        if autocast:  # pow upcasts: x^3, tanh and 1+tanh are float32, 0.5x stays 16-bit
            add("GELU (tanh form) internals", i * (4 + 4 + 4 + c))
            add("GELU output (16-bit copy, MLP projection input)", i * c)
        else:
            add("GELU (tanh form) internals: x, tanh, 0.5x, 1+tanh", 4 * i * f)
            add("GELU output (MLP projection input)", i * f)
        add("LayerNorm statistics", 2 * 2 * f)
        add("final LayerNorm input", h * f, per_layer=False)
        add("output layer input", h * c, per_layer=False)
    elif shape.arch == "llama":
        add("RMSNorm 1 input and normalised input", 2 * h * f)
        add("q, k, v projection inputs", linear_inputs(3))
        attention_rows("query, key, value after rotary embedding", h + 2 * shape.kv_dim,
                       "query, and key and value repeated for every head", 3 * h)
        add("RMSNorm 2 input and normalised input", 2 * h * f)
        add("gate and up projection inputs", linear_inputs(2))
        add("SwiGLU: gate, silu(gate), up, product", 4 * i * c)
        add("RMSNorm statistics", 2 * f)
        add("final RMSNorm input and normalised input", 2 * h * f + f, per_layer=False)
        add("output layer input", h * c, per_layer=False)
    else:  # bert, post-norm
        add("q, k, v projection inputs (layer input)", linear_inputs(3))
        attention_rows("query, key, value", 3 * h, "query, key, value", 3 * h)
        add("LayerNorm 1 input", h * f)
        add("MLP input", linear_inputs(1))
        add("GELU input and output", 2 * i * c)
        add("LayerNorm 2 input", h * f)
        add("LayerNorm statistics", 2 * 2 * f)
        add("embedding LayerNorm input", h * f + 2 * f, per_layer=False)
        if shape.task == "masked_lm":
            add("MLM head: transform input, GELU, LayerNorm, decoder input",
                linear_inputs(1) + 2 * h * c + h * f + h * c, per_layer=False)
    if dropout:
        add("embedding dropout mask", h, per_layer=False)
    return rows


def layer_bytes_per_token(shape: ModelShape, seq_len: int, precision: str = "bf16",
                          attention: str = "sdpa", device: str = "cuda",
                          dropout: float = 0.0) -> float:
    """Bytes one transformer layer saves for backward per token (sum of the ledger's rows)."""
    return sum(r["bytes_per_token"] for r in activation_ledger(
        shape, seq_len, precision, attention, device, dropout) if r["per_layer"])


def loss_peak_bytes(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                    loss_chunk_size: int | None = None) -> int:
    """Logits and cross-entropy buffers at their peak, in the backward of the loss.

    Without chunks: the logits (compute dtype) stay referenced; the loss saved their
    float32 (or wider) log-probabilities, and the backward of log-softmax holds the gradient
    of the log-probabilities and its own result: ``c + 3w`` bytes per logit (w = 4, or 8 in
    fp64). With `loss_chunk_size` (positions per chunk, split over the rows as
    `losses.per_item_losses` does) only one chunk's float32 buffers exist at a time, but the
    logits' gradient is assembled whole from the chunks' gradients: the peak is about three
    logits-sized tensors in the compute dtype. Classification heads have no vocabulary-sized
    logits: 0.
    """
    _check_precision(precision)
    if not shape.has_lm_head:
        return 0
    c, w = COMPUTE_BYTES[precision], max(4, COMPUTE_BYTES[precision])
    logits = micro_batch * seq_len * shape.vocab
    if loss_chunk_size is None:
        return logits * (c + 3 * w)
    if loss_chunk_size < 1:
        raise ValueError(f"loss_chunk_size must be >= 1 position or None, got {loss_chunk_size}")
    per_row = max(1, loss_chunk_size // micro_batch)
    if per_row >= seq_len - 1 and c == w:  # one chunk and no upcast: the plain loss runs
        return logits * (c + 3 * w)
    chunk = micro_batch * min(per_row, seq_len) * shape.vocab
    # the last chunk's float32 buffers next to the other chunks' gradients, or the final cat
    return max(3 * c * logits, 2 * c * logits + (3 * w - c) * chunk)


def predict_memory(shape: ModelShape, micro_batch: int, seq_len: int, precision: str = "bf16",
                   optimizer: str = "adamw", attention: str = "sdpa", *,
                   checkpointing: bool = False, loss_chunk_size: int | None = None,
                   accum_steps: int = 2, first_step: bool = False, device: str = "cuda",
                   dropout: float = 0.0) -> dict:
    """Predicted peak of `torch.cuda.max_memory_allocated` (or of live CPU tensors) for
    training in PyTorch eager mode, by component, in bytes.

    Peak = model states + 16-bit weight copies (autocast caches them for the forward) +
    activations saved for backward + the loss's logits buffers, all alive at the start of
    the backward. Gradients are alive there when the window has more than one micro-batch
    (`accum_steps` >= 2, the planning case); optimizer states from the second optimizer
    step on (`first_step=False`). With activation checkpointing (transformers'
    `gradient_checkpointing_enable`) each layer keeps only its input, and the backward
    recomputes one layer at a time. The peak is the larger of the loss phase (logits and loss
    buffers, `loss_peak_bytes`) and the layer phase (one layer's backward buffers, about
    ffn + hidden float32 numbers per token, plus its recomputed activations under
    checkpointing); then the optimizer step is compared. Returns the parts (the keys of
    `estimate_memory`), `total`, and `phase` (where the peak happens). Checked against
    measured CPU peaks (fp32: GPT-2, BERT, Llama, eager/SDPA, checkpointing, chunked loss)
    and H100 references (bf16, GPT-2 small); `dropout` > 0 adds the textbook 1-byte masks,
    not checked against a measurement.
    """
    _check_sizes(shape, micro_batch, seq_len)
    states = model_state_bytes(shape.parameters, precision, optimizer)
    grads_live = accum_steps >= 2
    tokens = micro_batch * seq_len
    ledger = activation_ledger(shape, seq_len, precision, attention, device, dropout)
    per_layer = sum(r["bytes_per_token"] for r in ledger if r["per_layer"]) * tokens
    once = sum(r["bytes_per_token"] for r in ledger if not r["per_layer"]) * tokens
    f = MASTER_BYTES[precision]
    loss = loss_peak_bytes(shape, micro_batch, seq_len, precision, loss_chunk_size)
    # gradients flowing through a layer's backward (MLP-wide and residual-wide buffers)
    workspace = (shape.ffn + shape.hidden) * f * tokens
    kept = shape.layers * (shape.hidden * f * tokens if checkpointing else per_layer)
    # with checkpointing each layer keeps only its input; the backward recomputes one layer
    layer_phase = once + workspace + (per_layer if checkpointing else 0)
    if once + loss >= layer_phase:
        activations, logits, phase = kept + once, loss, "loss backward"
    else:
        activations, logits = kept + layer_phase, 0
        phase = "layer recompute and backward" if checkpointing else "layer backward"
    parts = {
        "weights": states["weights"],
        "gradients": states["gradients"] if grads_live else 0,
        "optimizer": 0 if first_step else states["optimizer"],
        "weight_copies": states["weight_copies"],
        "activations": int(activations),
        "logits": int(logits),
    }
    total = sum(parts.values())
    step_total = states["weights"] + states["gradients"] + states["optimizer"]
    if step_total > total:  # the optimizer step itself (fused/for-loop AdamW: no big buffers)
        parts = {**parts, "gradients": states["gradients"], "optimizer": states["optimizer"],
                 "weight_copies": 0, "activations": 0, "logits": 0}
        total, phase = step_total, "optimizer step"
    return {"micro_batch": micro_batch, "seq_len": seq_len, "precision": precision,
            "attention": _attention_name(attention), "checkpointing": checkpointing,
            "parameters": shape.parameters, **parts, "total": int(total), "phase": phase}


# ---------------------------------------------------------------- measurement


def saved_activation_bytes(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                           task: str | None = None) -> dict[str, int]:
    """Bytes the forward pass and loss save for backward, counted exactly on any device.

    Every tensor autograd saves passes through `torch.autograd.graph.saved_tensors_hooks`;
    distinct storages are counted once and the model's own parameters are left out. This is
    deterministic, unlike sampling the process's RSS, and works on CPU. The model's parameters
    must already be in the precision's parameter dtype (`accumlab.precision.PARAM_DTYPES`).

    Returns ``{"total", "logits", "layers"}``: `logits` counts the saved tensors as wide as the
    vocabulary (the loss's log-probabilities), `layers` the rest.
    """
    from .losses import detect_task, mean_loss
    from .precision import Precision
    from .window import default_forward

    task = task or detect_task(model)
    device = next(model.parameters()).device
    prec = Precision(precision, device)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, int]] = {}  # storage -> (bytes, last dimension)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params:
            last = t.shape[-1] if t.dim() else 0
            seen[ptr] = (max(seen.get(ptr, (0, 0))[0], storage.nbytes()), last)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with prec.autocast():
            logits = default_forward(model, batch)
        loss = mean_loss(logits, batch["labels"].to(device), task)
    vocab = logits.shape[-1]
    del loss, logits
    total = sum(n for n, _ in seen.values())
    wide = sum(n for n, last in seen.values() if last == vocab)
    return {"total": total, "logits": wide, "layers": total - wide}


def measure_training_memory(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                            optimizer: str = "adamw", task: str | None = None) -> dict:
    """Memory of one real training step (forward, loss, backward, optimizer step), in bytes.

    On a CUDA device the peak is `torch.cuda.max_memory_allocated` over the step (method
    "cuda_peak"). On CPU, where no allocator keeps a peak, it is the sum of the model states
    actually allocated (weights, gradients, optimizer states after the step) and the bytes
    saved for backward (`saved_activation_bytes`, method "saved_tensors"); it leaves out
    short-lived temporaries, so it is a lower bound of the true peak.
    """
    from .losses import detect_task, mean_loss
    from .precision import Precision
    from .window import default_forward

    task = task or detect_task(model)
    device = next(model.parameters()).device
    prec = Precision(precision, device)
    model.to(dtype=prec.param_dtype)
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = (torch.optim.AdamW(params, lr=1e-6, fused=cuda or None) if optimizer == "adamw"
           else torch.optim.SGD(params, lr=1e-6, momentum=0.9 if optimizer == "sgd_momentum"
                                else 0.0))  # fused AdamW on CUDA, as accumlab.train uses
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with prec.autocast():
        logits = default_forward(model, batch)
    loss = mean_loss(logits, batch["labels"].to(device), task)
    loss.backward()
    del loss, logits
    opt.step()
    states = _tensor_bytes(list({id(p): p for p in params}.values()))
    grads = _tensor_bytes([p.grad for p in params if p.grad is not None])
    optim = _tensor_bytes([t for s in opt.state.values() for t in s.values()
                           if isinstance(t, torch.Tensor) and t.dim() > 0])
    result = {"method": "cuda_peak" if cuda else "saved_tensors", "weights": states,
              "gradients": grads, "optimizer": optim}
    if cuda:
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device)
        result["before_step"] = before
        result["activations"] = None
    else:
        model.zero_grad(set_to_none=True)
        result["activations"] = saved_activation_bytes(model, batch, precision, task)["total"]
        result["peak"] = states + grads + optim + result["activations"]
    del opt
    model.zero_grad(set_to_none=True)
    return result


def _training_window(model, batch, precision: str, optimizer, accum_steps: int, task: str,
                     loss_chunk_size: int | None) -> None:
    """One accumulation window of `accum_steps` copies of `batch`, then one optimizer step."""
    from .losses import count_items, summed_loss
    from .precision import Precision
    from .window import default_forward

    device = next(model.parameters()).device
    prec = Precision(precision, device)
    labels = batch["labels"].to(device)
    n = count_items(labels, task) * accum_steps
    kwargs = {"chunk_size": loss_chunk_size} if loss_chunk_size is not None else {}
    for _ in range(accum_steps):
        with prec.autocast():
            logits = default_forward(model, batch)
        (summed_loss(logits, labels, task, **kwargs) / n).backward()
        del logits
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_peak_memory(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                        optimizer: str = "adamw", accum_steps: int = 2, *,
                        first_step: bool = False, loss_chunk_size: int | None = None,
                        task: str | None = None) -> dict:
    """The true peak of live tensor bytes during one training window, on CPU or CUDA.

    The window runs `accum_steps` forward+backward passes of `batch` and one optimizer step,
    after a first warm-up window (so that AdamW's states exist, as in every step but the
    first) unless `first_step`. On CUDA the peak is `torch.cuda.max_memory_allocated`; on CPU
    it comes from the allocation and free events of `torch.profiler` (profile_memory=True),
    added to the bytes already alive when it starts. Both count tensors only (no allocator
    cache, no CUDA context). Returns ``{"peak", "method", "states", "seconds"}`` in bytes.
    The model is trained by the call (one or two steps at lr 1e-6); pass a copy to keep it.
    """
    from .losses import detect_task
    from .precision import Precision

    task = task or detect_task(model)
    device = next(model.parameters()).device
    model.to(dtype=Precision(precision, device).param_dtype)
    model.train()
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    cuda = device.type == "cuda"
    opt = _make_optimizer(params, optimizer, cuda)

    def window() -> None:
        _training_window(model, batch, precision, opt, accum_steps, task, loss_chunk_size)

    if not first_step:
        window()
    gc.collect()
    states = _tensor_bytes([*params, *[t for s in opt.state.values() for t in s.values()
                                       if isinstance(t, torch.Tensor)]])
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        window()
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    else:
        before = _tensor_bytes([*params, *[b for b in batch.values()
                                           if isinstance(b, torch.Tensor)]]) + states - \
            _tensor_bytes(params)
        with _quiet_stderr(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            window()
        peak, method = before + _peak_of_memory_events(prof), "cpu_profiler"
    seconds = time.perf_counter() - t0
    opt.state.clear()
    model.zero_grad(set_to_none=True)
    return {"peak": int(peak), "method": method, "states": states, "seconds": seconds}


def measure_peak_memory_cuda(model: torch.nn.Module, batch: dict, precision: str = "bf16",
                             optimizer: str = "adamw", accum_steps: int = 2, **kwargs) -> dict:
    """`measure_peak_memory` on a CUDA model (`max_memory_allocated` over one window)."""
    if next(model.parameters()).device.type != "cuda":
        raise ValueError("measure_peak_memory_cuda needs a model on a CUDA device: "
                         "call model.cuda() first, or use measure_peak_memory on CPU")
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return measure_peak_memory(model, batch, precision, optimizer, accum_steps, **kwargs)


def _make_optimizer(params, optimizer: str, cuda: bool) -> torch.optim.Optimizer:
    if optimizer == "adamw":  # fused on CUDA, as accumlab.train uses
        return torch.optim.AdamW(params, lr=1e-6, fused=True if cuda else None)
    if optimizer in ("sgd", "sgd_momentum"):
        return torch.optim.SGD(params, lr=1e-6,
                               momentum=0.9 if optimizer == "sgd_momentum" else 0.0)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZER_STATES)}, got {optimizer!r}")


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's C-level start/stop lines (file descriptors 1 and 2)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    saved = []
    try:
        with open(os.devnull, "w") as null:
            for fd in (1, 2):
                with contextlib.suppress(OSError):
                    saved.append((fd, os.dup(fd)))
                    os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


def _peak_of_memory_events(prof) -> int:
    """Largest running sum of allocation (+) and free (-) sizes in a profile, in bytes."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


def _tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def gib(n_bytes: float) -> float:
    """Bytes to GiB (2**30 bytes)."""
    return n_bytes / GIB


def fits(n_bytes: float, budget_gib: float) -> bool:
    """Whether `n_bytes` fit in a memory budget given in GiB."""
    return n_bytes <= budget_gib * GIB and math.isfinite(n_bytes)


__all__ = [
    "ARCHS", "ATTENTIONS", "GIB", "MIB", "NAMED_SHAPES", "REFERENCE_H100_ATTENTION",
    "REFERENCE_H100_GPT2_SMALL", "ModelShape", "activation_bytes", "activation_ledger",
    "estimate_memory", "fit_linear", "fits", "gib", "largest_fitting", "largest_micro_batch",
    "layer_bytes_per_token", "logits_bytes", "loss_peak_bytes", "measure_peak_memory",
    "measure_peak_memory_cuda", "measure_training_memory", "memory_sweep", "model_names",
    "model_state_bytes", "plan_accumulation", "predict_memory", "saved_activation_bytes",
]
