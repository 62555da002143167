"""Process-group set-up for torchrun (DDP on one or many nodes) and the few collectives the engine needs (the
models' and objectives' are in :mod:`dex.collectives`)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL on GPUs,
    gloo on CPUs. Without those variables, or with one process, a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no GPU is visible")
    target = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DistContext(rank, world, local, target)


def shard_model(model: nn.Module, units: list[nn.Module]) -> None:
    """FSDP (``fully_shard``, in place): every module of ``units`` (an objective's encoder and decoder blocks) is a
    unit, then the whole model.

    Parameters are sharded along their first dimension, except the stacked expert tensors ([R, out, in] and
    [R, out]), which are sharded along their second: then a rank holds the same rows of every expert and of the
    director, and the group EMA needs no communication.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from dex.models import ExpertBank

    stacked = {id(p) for m in model.modules() if isinstance(m, ExpertBank) for p in m.parameters()}

    def placement(param: nn.Parameter) -> Shard:
        return Shard(1) if id(param) in stacked else Shard(0)

    for block in units:
        fully_shard(block, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)


def all_ranks_true(flag: bool, ctx: DistContext) -> bool:
    """True only when ``flag`` holds on every rank."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def any_rank_true(flag: bool, ctx: DistContext) -> bool:
    """True when ``flag`` holds on at least one rank."""
    return not all_ranks_true(not flag, ctx)


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
