"""Precision settings: parameter dtype, autocast context and GradScaler for a run."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

PARAM_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.float32,
                "fp16": torch.float32}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Precision:
    """How a precision name is carried out on a device.

    Parameters (and so accumulated gradients) stay in float32 under bf16/fp16 autocast, or
    float64 for fp64. fp16 gets a GradScaler; TF32 matmuls are off for fp32 so that "fp32"
    means IEEE float32.
    """

    name: str
    device: torch.device

    @property
    def param_dtype(self) -> torch.dtype:
        return PARAM_DTYPES[self.name]

    def autocast(self):
        """Context manager for the forward pass (a no-op for fp32/fp64)."""
        if self.name in AUTOCAST_DTYPES:
            return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.name])
        return contextlib.nullcontext()

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A GradScaler for fp16, else None."""
        return torch.amp.GradScaler(self.device.type) if self.name == "fp16" else None

    def apply_matmul_settings(self) -> None:
        """Turn TF32 off for fp32 runs (torch's default is already off for matmul)."""
        if self.name == "fp32" and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False


def resolve_device(name: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("TrainConfig.device='cuda' but no CUDA GPU is visible: use 'auto'")
    return torch.device(name)
