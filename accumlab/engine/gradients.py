"""Gradients as one vector, and the relative difference used by every equivalence check."""

from __future__ import annotations

import torch


def gradient_vector(model: torch.nn.Module) -> torch.Tensor:
    """All parameter gradients flattened into one float64 vector (zeros where None)."""
    return torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
        for p in model.parameters()
    ])


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())
