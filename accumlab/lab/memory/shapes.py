"""Model shapes and byte sizes: the inputs every memory estimate starts from.

`ModelShape` holds the sizes that decide a transformer's training memory (GPT-2, BERT and
Llama); `NAMED_SHAPES` the published configs `accumlab plan --model NAME` knows. The H100
reference measurements are quoted, not computed here.
"""

from __future__ import annotations

import math
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
        """The shape `accumlab.engine.models.make_model("gpt2", size)` builds (same defaults)."""
        from accumlab.engine.models import DEFAULT_VOCAB, SIZES

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
        from accumlab.engine.models import SIZES

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
        from accumlab.engine.losses import detect_task

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
    from accumlab.engine.models import SIZES

    return list(SIZES) + list(NAMED_SHAPES)


def check_precision(precision: str) -> None:
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision must be one of {list(COMPUTE_BYTES)}, got {precision!r}")


def check_sizes(shape: ModelShape, micro_batch: int, seq_len: int) -> None:
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    if seq_len > shape.positions:
        raise ValueError(f"seq_len={seq_len} is longer than the model's {shape.positions} "
                         "positions")


def gib(n_bytes: float) -> float:
    """Bytes to GiB (2**30 bytes)."""
    return n_bytes / GIB


def fits(n_bytes: float, budget_gib: float) -> bool:
    """Whether `n_bytes` fit in a memory budget given in GiB."""
    return n_bytes <= budget_gib * GIB and math.isfinite(n_bytes)
