"""Fully sharded data parallelism with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

Under `torchrun` with `TrainConfig(parallel="fsdp")`, each of the R ranks keeps 1/R of every
parameter, gradient and optimizer state (ZeRO stage 3). Before a block's forward FSDP
all-gathers its weights; after its backward it reduce-scatters its gradient, so that each rank
ends with the summed gradient of its own shard. The accumulation window is unchanged:

    window of k micro-batches             FSDP
    micro-batches 1 .. k-1                set_requires_gradient_sync(False): no reduce-scatter,
                                          each rank keeps its *unsharded* gradient meanwhile
    micro-batch k                         one reduce-scatter per block: sharded gradient
    step                                  clip by the global norm of the sharded gradient,
                                          optimizer step on the local shards

`sync_every_micro_batch=True` reduce-scatters after every micro-batch instead: gradients stay
sharded between micro-batches (less memory) at k times the communication. FSDP averages the
gradients over ranks, like DDP, and `Window.loss` undoes that average, so the gradient is that
of L_W whichever way it is synchronised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from accumlab.engine import distributed


def check_launch(cfg) -> None:
    """Under parallel='fsdp', raise unless this process is one of >= 2 torchrun ranks."""
    if cfg.parallel == "fsdp" and not distributed.is_distributed():
        raise ValueError(
            "parallel='fsdp' shards the model over the ranks of a torchrun launch, and this "
            "process is not one of two or more (no RANK/WORLD_SIZE in the environment, or one "
            "rank): launch the script with `torchrun --nproc_per_node=2 train.py`, or train "
            "with parallel='ddp' (the default), which runs in a single process too")


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer: the largest ModuleList of one module class.

    GPT-2: `transformer.h`; BERT: `bert.encoder.layer`. Empty when the model has none (then
    only the root is sharded, as one group).
    """
    best, best_size = [], 0
    for module in model.modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = list(module), size
    return best


def mixed_precision(precision: str):
    """FSDP2's policy: bf16 weights in forward/backward, float32 gradient reduction and
    accumulation (contract point 5); the full precision of the parameters otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: torch.nn.Module, device: torch.device, cfg) -> torch.nn.Module:
    """Apply `fully_shard` to every transformer block, then to the root; returns the model.

    The root's group holds the embeddings, the final norm and the head; a tied input/output
    embedding is one parameter there, so it is sharded, gathered and reduced once. Unless
    `cfg.sync_every_micro_batch`, the model gets a `no_sync()` context (as DDP has) that the
    accumulation window enters around the first k-1 micro-batches.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (distributed.world_size(),))
    policy = mixed_precision(cfg.precision)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if not cfg.sync_every_micro_batch:
        model.no_sync = lambda: skip_gradient_sync(model)
    return model


@contextlib.contextmanager
def skip_gradient_sync(model: torch.nn.Module) -> Iterator[None]:
    """No gradient reduce-scatter for backwards inside the block; the gradient accumulates
    unsharded (in the reduce dtype) until a backward outside it reduces the sum once."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def is_sharded(model: torch.nn.Module) -> bool:
    """True for a model that `fully_shard` wrapped."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes this rank holds in optimizer state (for AdamW: both moments and the step)."""
    return sum(local(v).numel() * local(v).element_size()
               for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (its shards of DTensors)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def _fsdp_params(model: torch.nn.Module) -> list:
    """FSDP's record of each sharded parameter (a private structure of FSDP2)."""
    from torch.distributed.fsdp import FSDPModule

    return [param for module in model.modules() if isinstance(module, FSDPModule)
            for group in module._get_fsdp_state()._fsdp_param_groups
            for param in group.fsdp_params]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights this rank keeps (its shards under FSDP; gathered copies are freed)."""
    if not is_sharded(model):
        return local_bytes({id(p): p for p in model.parameters()}.values())
    return local_bytes(param.sharded_param for param in _fsdp_params(model))


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of gradient this rank holds now: its `.grad` (shards under FSDP) plus the unsharded
    gradients that FSDP keeps between backwards whose sync was skipped."""
    if not is_sharded(model):
        return local_bytes({id(p): p.grad for p in model.parameters() if p.grad is not None}
                           .values())
    total = 0
    for param in _fsdp_params(model):
        # between forward and backward a module holds the gathered parameter, not the shard
        unsharded = getattr(param, "_unsharded_param", None)
        for grad in (param.sharded_param.grad, param.unsharded_accumulated_grad,
                     None if unsharded is None else unsharded.grad):
            if grad is not None:
                total += local(grad).numel() * local(grad).element_size()
    return total


def save_pretrained(model: torch.nn.Module, folder: str) -> None:
    """`model.save_pretrained(folder)` from rank 0 only; a sharded model's whole weights are
    gathered first (a collective: call it on every rank)."""
    state = None
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(model, options=options)  # whole tensors on rank 0 only
    if distributed.is_main_process():
        model.save_pretrained(folder, state_dict=state)


def full_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Name -> the whole parameter, on every rank (a collective: call it on all ranks).

    For a model that is not sharded this is a detached copy of its parameters.
    """
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def count_collectives(model: torch.nn.Module) -> dict:
    """Count FSDP's collectives on a sharded model from now on; returns the live counter.

    Keys: `reduce_scatters` and `all_gathers` (calls: one per sharded group each time it
    communicates), their bytes (the whole unsharded buffer of each call; in a ring each rank
    sends (R-1)/R of it), and `groups`. Set the values back to 0 to start a new count.
    """
    # FSDP's own default collectives (a private module), wrapped to count
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import (
        DefaultAllGather,
        DefaultReduceScatter,
    )

    counts = {"reduce_scatters": 0, "reduce_scatter_bytes": 0, "all_gathers": 0,
              "all_gather_bytes": 0, "groups": 0}

    class CountingReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            counts["reduce_scatters"] += 1
            counts["reduce_scatter_bytes"] += input_tensor.numel() * input_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, op, async_op)

    class CountingAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            counts["all_gathers"] += 1
            counts["all_gather_bytes"] += output_tensor.numel() * output_tensor.element_size()
            return super().__call__(output_tensor, input_tensor, group, async_op)

    reduce_scatter, all_gather = CountingReduceScatter(), CountingAllGather()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_reduce_scatter(reduce_scatter)
            module.set_custom_all_gather(all_gather)
            counts["groups"] += 1
    return counts
