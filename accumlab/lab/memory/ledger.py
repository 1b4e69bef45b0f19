"""What PyTorch really keeps: a tensor-by-tensor ledger of saved activations, and the
validated peak-memory prediction `predict_memory` that `accumlab plan` uses."""

from __future__ import annotations

from accumlab.lab.memory.shapes import (
    COMPUTE_BYTES,
    MASTER_BYTES,
    ModelShape,
    check_precision,
    check_sizes,
)
from accumlab.lab.memory.textbook import model_state_bytes

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
    check_precision(precision)
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
    check_precision(precision)
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
    check_sizes(shape, micro_batch, seq_len)
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


