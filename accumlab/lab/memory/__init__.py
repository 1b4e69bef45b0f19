"""Training memory: an analytic model, measurement, and what the planner builds on.

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
No plotting or widget code lives here. The parts: `shapes` (sizes and named models),
`textbook` (the lower-bound count), `ledger` (`predict_memory`), `measure` (measurement);
every public name is importable from `accumlab.lab.memory` itself.
"""

from accumlab.lab.memory.ledger import (
    ATTENTIONS,
    activation_ledger,
    layer_bytes_per_token,
    loss_peak_bytes,
    predict_memory,
)
from accumlab.lab.memory.measure import (
    measure_peak_memory,
    measure_peak_memory_cuda,
    measure_training_memory,
    saved_activation_bytes,
)
from accumlab.lab.memory.shapes import (
    ARCHS,
    COMPUTE_BYTES,
    GIB,
    MASTER_BYTES,
    MIB,
    NAMED_SHAPES,
    OPTIMIZER_STATES,
    REFERENCE_H100_ATTENTION,
    REFERENCE_H100_GPT2_SMALL,
    ModelShape,
    fits,
    gib,
    model_names,
)
from accumlab.lab.memory.textbook import (
    activation_bytes,
    estimate_memory,
    fit_linear,
    largest_fitting,
    largest_micro_batch,
    logits_bytes,
    memory_sweep,
    model_state_bytes,
    plan_accumulation,
)

__all__ = [
    "ARCHS", "ATTENTIONS", "COMPUTE_BYTES", "GIB", "MASTER_BYTES", "MIB", "NAMED_SHAPES",
    "OPTIMIZER_STATES", "REFERENCE_H100_ATTENTION", "REFERENCE_H100_GPT2_SMALL", "ModelShape",
    "activation_bytes", "activation_ledger", "estimate_memory", "fit_linear", "fits", "gib",
    "largest_fitting", "largest_micro_batch", "layer_bytes_per_token", "logits_bytes",
    "loss_peak_bytes", "measure_peak_memory", "measure_peak_memory_cuda",
    "measure_training_memory", "memory_sweep", "model_names", "model_state_bytes",
    "plan_accumulation", "predict_memory", "saved_activation_bytes",
]
