"""Model factory: GPT-2- and BERT-style transformers from "tiny" (tests) to GPT-2 small (GPUs).

Dropout is 0 by default, so that accumulated and single-batch updates can be compared exactly;
pass `dropout=0.1` for the usual training setting.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

# layers, width, heads
SIZES = {
    "tiny": (2, 64, 4),  # ~0.4M parameters with a 4096 vocabulary
    "mini": (4, 128, 4),  # ~1.3M
    "small": (6, 256, 8),  # ~5.8M
    "medium": (8, 512, 8),  # ~27M
    "gpt2-small": (12, 768, 12),  # 124M with the GPT-2 vocabulary
}
DEFAULT_VOCAB = 4096
PAD_ID, EOS_ID = 1, 0  # ids in the shipped tokenizer
_AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "masked_lm": AutoModelForMaskedLM,
    "classification": AutoModelForSequenceClassification,
}


def _size(size: str) -> tuple[int, int, int]:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}: choose one of {list(SIZES)}")
    return SIZES[size]


def gpt2_config(
    size: str = "tiny", vocab_size: int = DEFAULT_VOCAB, max_positions: int = 256,
    dropout: float = 0.0, **overrides,
) -> GPT2Config:
    """A GPT2Config of a named size (the shipped tokenizer's special ids by default)."""
    layers, width, heads = _size(size)
    if size == "gpt2-small" and "vocab_size" not in overrides and vocab_size == DEFAULT_VOCAB:
        vocab_size = 50257
    kwargs = dict(
        vocab_size=vocab_size, n_positions=max_positions, n_embd=width, n_layer=layers,
        n_head=heads, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def bert_config(
    size: str = "tiny", vocab_size: int = DEFAULT_VOCAB, max_positions: int = 256,
    dropout: float = 0.0, num_labels: int = 2, **overrides,
) -> BertConfig:
    """A BertConfig of a named size, with `num_labels` for classification heads."""
    layers, width, heads = _size(size)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=4 * width,
        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout, classifier_dropout=dropout,
        num_labels=num_labels, pad_token_id=PAD_ID,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def make_model(
    arch: str = "gpt2",
    size: str = "tiny",
    task: str | None = None,
    *,
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    **config_kwargs,
) -> torch.nn.Module:
    """A freshly initialised model: `arch` "gpt2" (causal LM) or "bert" (classification/MLM).

    `seed` makes the initialisation reproducible; `config_kwargs` go to `gpt2_config` or
    `bert_config` (e.g. vocab_size, dropout, num_labels, max_positions).
    """
    if seed is not None:
        torch.manual_seed(seed)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if arch == "gpt2":
        task = task or "causal_lm"
        if task != "causal_lm":
            raise ValueError(f"arch='gpt2' supports task='causal_lm', got {task!r}")
        model = GPT2LMHeadModel._from_config(gpt2_config(size, **config_kwargs), dtype=dtype,
                                             **extra)
        model.loss_type = "ForCausalLM"  # else transformers counts unshifted labels
    elif arch == "bert":
        task = task or "classification"
        cls = {"classification": BertForSequenceClassification, "masked_lm": BertForMaskedLM}
        if task not in cls:
            raise ValueError(f"arch='bert' supports {list(cls)}, got task={task!r}")
        model = cls[task]._from_config(bert_config(size, **config_kwargs), dtype=dtype, **extra)
    else:
        raise ValueError(f"unknown arch {arch!r}: choose 'gpt2' or 'bert'")
    model.accumlab_task = task
    return model


def load_model(name_or_path: str, task: str = "causal_lm", **kwargs) -> torch.nn.Module:
    """`from_pretrained` for a local folder or (when online) a hub id, by task."""
    if task not in _AUTO:
        raise ValueError(f"task must be one of {list(_AUTO)}, got {task!r}")
    model = _AUTO[task].from_pretrained(name_or_path, **kwargs)
    if task == "causal_lm" and getattr(model, "loss_type", None) is None:
        model.loss_type = "ForCausalLM"
    model.accumlab_task = task
    return model


def load_config(name_or_path: str, **kwargs):
    """`AutoConfig.from_pretrained` passthrough (local folder or hub id)."""
    return AutoConfig.from_pretrained(name_or_path, **kwargs)


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
