"""Long sequences, measured: memory and time against sequence length, the attention matrix,
and what activation checkpointing saves and costs. The numbers behind notebook 07.

Every function trains or runs a real model; the predictions they are compared with come from
`accumlab.lab.memory.predict_memory`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from accumlab.data.packing import pack_examples
from accumlab.lab import memory


def corpus_rows(tokenizer, seq_len: int, rows: int, split: str = "train") -> list[dict]:
    """`rows` rows of exactly `seq_len` tokens of real corpus text (documents concatenated)."""
    from accumlab.data.corpus import lm_examples

    examples = lm_examples(tokenizer, split, max_length=512, limit=max(64, rows * seq_len // 40))
    packed = pack_examples(examples, seq_len, eos_token_id=tokenizer.eos_token_id)
    if len(packed) < rows:
        raise ValueError(f"the {split} corpus gave {len(packed)} rows of {seq_len} tokens, "
                         f"fewer than {rows}: ask for fewer rows or shorter sequences")
    return packed[:rows]


def as_batch(rows: Sequence[dict]) -> dict:
    """Stack equal-length rows into a batch with a full attention mask."""
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([r["labels"] for r in rows])}


def enable_checkpointing(model: torch.nn.Module) -> torch.nn.Module:
    """Turn on transformers' activation checkpointing (non-reentrant), as
    `TrainConfig(gradient_checkpointing=True)` does; returns the model."""
    import warnings

    with warnings.catch_warnings():  # 5.24 renamed it; 5.17 has only the old name
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    return model


def step_seconds(model: torch.nn.Module, batch: dict, precision: str = "fp32",
                 repeats: int = 3) -> float:
    """Median wall time of one forward + backward + AdamW step (after one warm-up step)."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        memory.measure.training_window(model, batch, precision, opt, 1, "causal_lm", None)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare_step_times(models: dict[str, torch.nn.Module], batch: dict,
                       precision: str = "fp32", repeats: int = 3) -> dict[str, float]:
    """Median step time of each model on the same batch, timed in turns (one step of each,
    then again), so that a busy machine slows them alike."""
    optimizers = {}
    for name, model in models.items():
        model.train()
        optimizers[name] = torch.optim.AdamW(model.parameters(), lr=1e-6)
        memory.measure.training_window(model, batch, precision, optimizers[name], 1, "causal_lm", None)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            memory.measure.training_window(model, batch, precision, optimizers[name], 1,
                                    "causal_lm", None)
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def length_sweep(build_model: Callable[[], torch.nn.Module], batches: dict[int, dict],
                 precision: str = "fp32", attention: str = "sdpa",
                 checkpointing: bool = False, repeats: int = 3) -> list[dict]:
    """Measured peak memory (CPU profiler or CUDA), predicted peak and step time for each
    sequence length in `batches` ({seq_len: batch}); a fresh model per length."""
    records = []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seq_len, batch in batches.items():
        model = build_model()
        if checkpointing:
            enable_checkpointing(model)
        shape = memory.ModelShape.from_model(model)
        micro = int(batch["input_ids"].shape[0])
        measured = memory.measure_peak_memory(model.to(device), batch, precision)
        predicted = memory.predict_memory(shape, micro, seq_len, precision,
                                          attention=attention, checkpointing=checkpointing,
                                          device=device)
        records.append({
            "seq_len": seq_len, "micro_batch": micro,
            "measured_mib": measured["peak"] / memory.MIB,
            "predicted_mib": predicted["total"] / memory.MIB,
            "ratio": predicted["total"] / measured["peak"],
            "seconds": step_seconds(model, batch, precision, repeats),
        })
    return records


def attention_matrix_bytes(build_model: Callable[[str], torch.nn.Module], batch: dict,
                           precision: str = "fp32") -> dict:
    """Bytes saved for backward with eager attention minus with SDPA: the s x s attention
    probabilities that a fused kernel never stores (measured with `saved_activation_bytes`).
    `build_model(attn_implementation)` builds the same model with either attention."""
    saved = {attn: memory.saved_activation_bytes(build_model(attn), batch, precision)["layers"]
             for attn in ("eager", "sdpa")}
    return {**saved, "difference": saved["eager"] - saved["sdpa"]}


def count_block_forwards(model: torch.nn.Module, batch: dict) -> int:
    """How many times the transformer blocks run their forward in one forward + backward
    (each block once without checkpointing, twice with it: the recomputation)."""
    # module hooks do not fire in the recomputation: count calls of each MLP's forward
    mlps = [getattr(b, "mlp", None) or b.intermediate for b in _blocks(model)]
    calls = [0]

    def counting(forward):
        def wrapped(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)
        return wrapped

    for m in mlps:
        m.forward = counting(m.forward)
    model.train()  # checkpointing is active in training mode only
    try:
        memory.measure.training_window(model, batch, "fp32",
                                torch.optim.SGD(model.parameters(), lr=0.0), 1,
                                "causal_lm", None)
    finally:
        for m in mlps:
            del m.forward  # back to the class's forward
    return calls[0]


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    for path in ("transformer.h", "model.layers", "bert.encoder.layer"):
        module = model
        try:
            for name in path.split("."):
                module = getattr(module, name)
        except AttributeError:
            continue
        return list(module)
    raise ValueError(f"cannot find the transformer blocks of a {type(model).__name__}")


__all__ = ["as_batch", "attention_matrix_bytes", "compare_step_times", "corpus_rows",
           "count_block_forwards", "enable_checkpointing", "length_sweep", "step_seconds"]
