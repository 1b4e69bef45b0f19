"""accumlab: exact gradient accumulation for transformers models, and a course around it.

    import accumlab
    result = accumlab.train(model, data, accumlab.TrainConfig(micro_batch_size=4,
                                                              accum_steps=8, max_steps=100))
"""

from accumlab.doctor import check_loop
from accumlab.engine.config import TrainConfig
from accumlab.engine.losses import IGNORE_INDEX
from accumlab.engine.trainer import OutOfMemoryError, StopTraining, TrainResult, train
from accumlab.engine.window import (
    Accumulator,
    EmptyWindowWarning,
    MeanOfMeansWarning,
    Window,
    WindowRecord,
)
from accumlab.lab.equivalence import compare_gradients

__version__ = "0.1.0"

__all__ = [
    "Accumulator",
    "EmptyWindowWarning",
    "IGNORE_INDEX",
    "MeanOfMeansWarning",
    "OutOfMemoryError",
    "StopTraining",
    "TrainConfig",
    "TrainResult",
    "Window",
    "WindowRecord",
    "check_loop",
    "compare_gradients",
    "train",
]
