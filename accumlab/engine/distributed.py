"""Small helpers over torch.distributed that also work when it is not initialised."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of data-parallel ranks (1 outside torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    """Rank 0, which logs and writes checkpoints."""
    return rank() == 0


def collective_device() -> torch.device:
    """Device on which the current backend reduces tensors (CUDA for NCCL, else CPU)."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks in place (a no-op on one process); returns it."""
    if is_distributed():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that `torchrun` describes in the environment, if any.

    Returns True when running distributed. Chooses NCCL with CUDA, else gloo.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return is_distributed()
