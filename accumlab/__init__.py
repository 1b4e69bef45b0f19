"""accumlab: exact gradient accumulation for transformers models, and a course around it.

    import accumlab
    result = accumlab.train(model, data, accumlab.TrainConfig(micro_batch_size=4,
                                                              accum_steps=8, max_steps=100))
"""

from .config import TrainConfig
from .doctor import check_loop
from .equivalence import compare_gradients
from .losses import IGNORE_INDEX
from .trainer import OutOfMemoryError, StopTraining, TrainResult, train
from .window import Accumulator, EmptyWindowWarning, MeanOfMeansWarning, Window, WindowRecord

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
