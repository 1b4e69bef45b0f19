"""Small helpers over torch.distributed that also work when it is not initialised."""

from __future__ import annotations

import os
from datetime import timedelta

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


class CollectiveError(RuntimeError):
    """A collective operation failed or timed out: another rank is frozen, dead or failed."""


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group that `torchrun` describes in the environment, if any.

    Returns True when running distributed. Chooses NCCL with CUDA, else gloo. `timeout_s`
    bounds every collective (torch's default is 30 minutes); a process group that the caller
    already made keeps its own timeout.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        timeout = timedelta(seconds=timeout_s) if timeout_s else None
        dist.init_process_group(backend=backend, timeout=timeout)
    return is_distributed()


def all_gather_ints(values: list[int]) -> list[list[int]]:
    """Every rank's `values` (the same count on each), in rank order."""
    if not is_distributed():
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.int64, device=collective_device())
    out = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


def check_same_data(n_examples: int, fingerprint: str | None, name: str = "train_data") -> None:
    """Raise on every rank when the ranks hold datasets of different sizes or contents.

    Each rank trains on its share of the same dataset; unequal sizes would make one rank finish
    its epochs early and the others wait for it forever.
    """
    if not is_distributed():
        return
    digest = int(fingerprint[:15], 16) if fingerprint else -1
    rows = all_gather_ints([n_examples, digest])
    sizes = [r[0] for r in rows]
    if len(set(sizes)) > 1:
        listed = ", ".join(f"rank {i} has {n}" for i, n in enumerate(sizes))
        raise ValueError(f"the ranks hold {name} of different sizes ({listed} examples): every "
                         "rank must load the same dataset (accumlab gives each rank its share)")
    digests = [r[1] for r in rows]
    if -1 not in digests and len(set(digests)) > 1:
        raise ValueError(f"the ranks hold different {name} of the same size ({sizes[0]} "
                         "examples): every rank must load the same dataset, in the same order")


def explain_failure(error: BaseException, where: str, timeout_s: float | None) -> None:
    """Raise a CollectiveError naming this rank and `where` if `error` is a collective's timeout
    or broken connection (another rank frozen or dead); otherwise return."""
    if not is_distributed() or not _is_collective_failure(error):
        return
    waited = f" (collective_timeout_s={timeout_s:g})" if timeout_s else ""
    raise CollectiveError(
        f"rank {rank()} of {world_size()}: a collective operation failed {where}{waited}: "
        "another rank is frozen, dead, or stopped with an error of its own; look at its "
        f"output. The backend said: {str(error).strip().splitlines()[0][:300]}"
    ) from error


def _is_collective_failure(error: BaseException) -> bool:
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(k in text for k in ("timed out", "timeout", "connection closed",
                                   "connection reset", "broken pipe", "gloo", "nccl"))
