"""Several processes with ``torchrun``: DistributedDataParallel on NCCL (GPUs) or gloo (CPU).

A script started by ``torchrun --nproc_per_node=N`` finds WORLD_SIZE/RANK/LOCAL_RANK in its
environment; a plain ``python`` start has none and runs as a single process (every helper
here then degrades to the single-process answer).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group when started by torchrun; returns (context, this rank's device).

    CUDA ranks use NCCL and the GPU of their LOCAL_RANK; CPU ranks use gloo.
    """
    if not launched_by_torchrun():
        return Context(), device
    ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(order: list, ctx: Context) -> list:
    """This rank's share of an epoch's items: every world_size-th item from its rank.

    When the count does not divide, the order is first extended by wrapping around (as
    torch's DistributedSampler does) so that every rank takes the same number of steps.
    """
    if not ctx.distributed or not order:
        return list(order)
    per_rank = -(-len(order) // ctx.world_size)
    padded = (order * ctx.world_size)[:per_rank * ctx.world_size] if len(order) < per_rank * ctx.world_size \
        else order
    return padded[ctx.rank::ctx.world_size]


def any_rank(flag: bool, ctx: Context, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: call on all ranks)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def main_rank_decides(flag: bool, ctx: Context, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (a collective: call on all ranks)."""
    if not ctx.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.broadcast(t, 0)
    return bool(t.item() > 0)


def mean_over_ranks(values: dict[str, float], ctx: Context, device: torch.device) -> dict[str, float]:
    """Each value averaged over ranks (a collective: call on all ranks with the same keys)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / ctx.world_size for k, v in zip(keys, t.tolist())}


def gather_objects(value, ctx: Context) -> list:
    """Every rank's ``value``, in rank order (a collective: call on all ranks)."""
    if not ctx.distributed:
        return [value]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


__all__ = ["Context", "setup", "teardown", "shard", "any_rank", "main_rank_decides", "mean_over_ranks",
           "barrier", "gather_objects", "launched_by_torchrun"]
