"""Several processes (`torchrun --nproc_per_node N`): DDP or FSDP2, one process unchanged.

Each rank back-propagates the loss of its own rows divided by the step's global counts over N (`step_counts`);
with C = sum_r C_r tokens (or rows) in the step, that is the gradient of the whole batch:

    1/N sum_r grad( sum_{i in r} l_i / (C / N) ) = grad( sum_i l_i / C )

Without torchrun every function here is the one-process identity: rank 0 of 1.
Details (FSDP2, whole weights for sampling): docs/engine.md, section engine/distributed.py.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

MODES = ("ddp", "fsdp2")


def start(device: str) -> None:
    """Join the process group torchrun describes in the environment (nothing to do when run alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # a long timeout: rank 0 may train the SFT warm start while the others wait
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(hours=2))


def stop(finished: bool) -> None:
    """Leave the process group, after a barrier when the run `finished` (a failed one leaves at once); explicitly,
    not at interpreter exit, where gloo's threads abort (docs/engine.md)."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_reduce(value: Tensor, op: str = "sum") -> Tensor:
    """The sum ("sum"), mean ("mean"), "max" or "min" of `value` over the ranks (a new tensor)."""
    if not dist.is_initialized():
        return value.detach().clone()
    reduced = value.detach().to("cuda" if dist.get_backend() == "nccl" else "cpu", copy=True)
    dist.all_reduce(reduced, op={"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                                 "min": dist.ReduceOp.MIN}[op])
    return (reduced / dist.get_world_size() if op == "mean" else reduced).to(value.device)


def average_gradients(parameters: list[Tensor]) -> None:
    """Average, in place, the gradients of parameters that DDP does not own (a strategy's head) over
    the ranks, as DDP averages the model's. A parameter with a gradient on some rank counts as zeros
    where it has none; one without a gradient on every rank keeps None (the optimizer skips it)."""
    if not dist.is_initialized() or not parameters:
        return
    anywhere = all_reduce(torch.tensor([float(p.grad is not None) for p in parameters]), "max")  # [P]
    for parameter, has_gradient in zip(parameters, anywhere.tolist()):
        if has_gradient:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            parameter.grad.copy_(all_reduce(parameter.grad, "mean"))


def step_counts(mask: Tensor) -> tuple[float, float]:
    """(tokens, rows) of `mask` [b, T] summed over the ranks and divided by their number."""
    tokens, rows = all_reduce(torch.tensor([float(mask.sum()), float(mask.shape[0])]), "mean").tolist()
    return tokens, rows


def shard(items: list) -> list:
    """This rank's contiguous share of `items` (shares differ in length by at most one)."""
    rank, size = rank_and_size()
    return items[len(items) * rank // size : len(items) * (rank + 1) // size]


def gather(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank (any picklable value)."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def broadcast(value):
    """Rank 0's `value`, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(model, mode: str):
    """`model` inside DDP, or sharded by FSDP2 per decoder block; unchanged when run alone."""
    if not dist.is_initialized():
        return model
    if mode == "ddp":
        device_ids = [torch.cuda.current_device()] if next(model.parameters()).is_cuda else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    for block in model.get_decoder().layers:
        fully_shard(block)
    return fully_shard(model, reshard_after_forward=False)  # lm_head is used after the forward (engine/logprobs.py)


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


@contextmanager
def full_weights(model):
    """Under FSDP2, every sharded parameter replaced by its gathered whole tensor while inside."""
    swapped, gathered = [], {}  # gathered: id(shard) -> whole tensor, once per tied parameter
    with torch.no_grad():
        for module in model.modules() if is_sharded(model) else ():
            for name, parameter in list(module._parameters.items()):
                if isinstance(parameter, DTensor):
                    if id(parameter) not in gathered:
                        gathered[id(parameter)] = torch.nn.Parameter(parameter.full_tensor(), requires_grad=False)
                    module._parameters[name] = gathered[id(parameter)]
                    swapped.append((module, name, parameter))
    try:
        yield model
    finally:
        for module, name, parameter in swapped:
            module._parameters[name] = parameter


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
