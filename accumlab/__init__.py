"""accumlab: exact gradient accumulation for transformers models, and a course around it.

    import accumlab
    result = accumlab.train(model, data, accumlab.TrainConfig(micro_batch_size=4,
                                                              accum_steps=8, max_steps=100))

The names below are imported on first use (PEP 562), so that `import accumlab` alone, and the
`accumlab` command's --help, do not wait for torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "Accumulator": "accumlab.engine.window",
    "EmptyWindowWarning": "accumlab.engine.window",
    "IGNORE_INDEX": "accumlab.engine.losses",
    "MeanOfMeansWarning": "accumlab.engine.window",
    "OutOfMemoryError": "accumlab.engine.trainer",
    "StopTraining": "accumlab.engine.trainer",
    "TrainConfig": "accumlab.engine.config",
    "TrainResult": "accumlab.engine.trainer",
    "Window": "accumlab.engine.window",
    "WindowRecord": "accumlab.engine.window",
    "check_loop": "accumlab.doctor",
    "compare_gradients": "accumlab.lab.equivalence",
    "train": "accumlab.engine.trainer",
}

__all__ = sorted(_PUBLIC)


_LAYERS = ("engine", "data", "lab", "doctor", "ui", "cli")


def __getattr__(name: str):
    if name not in _PUBLIC and name not in _LAYERS:
        raise AttributeError(f"module 'accumlab' has no attribute {name!r}")
    for module in sorted(set(_PUBLIC.values())):  # what an eager `import accumlab` would load
        importlib.import_module(module)
    if name in _LAYERS:  # `accumlab.engine.checkpoint...` after a bare `import accumlab`
        return importlib.import_module(f"accumlab.{name}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
