r"""Data-parallel training with ``torchrun``: process group, seeding and gradient averaging.

Launch with ``torchrun --nproc_per_node=N -m monoflow images train ...``: torchrun sets
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, :func:`init_distributed` joins the group (NCCL on
GPUs, gloo on CPUs). Every rank builds the model from the same seed and then takes rank 0's
parameters and buffers (:func:`broadcast_module`), so spectral-norm vectors and ActNorm
statistics (synchronised by :class:`~monoflow.blocks.ActNorm` itself) agree everywhere.

Gradients are averaged by an explicit all-reduce after backward (:func:`average_gradients`),
the arithmetic of ``DistributedDataParallel``; an explicit reduction also covers the log-det
gradients that the memory-efficient estimator computes inside the forward pass. With equal local
batches, the average of the ranks' mean losses is the mean loss of the global batch, which is
what a single process computes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistributedContext", "init_distributed", "broadcast_module", "average_gradients",
           "all_reduce_sum", "barrier", "close_distributed"]


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs: ``rank`` of ``world_size``, its device and the backend ("" alone)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistributedContext:
    """Join the process group that ``torchrun`` describes in the environment (or run alone).

    ``device``: ``"cuda"``, ``"cpu"`` or ``None`` (CUDA when available). With CUDA each rank takes
    GPU ``LOCAL_RANK`` and NCCL; on CPU gloo.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    backend = ""
    if world_size > 1:
        backend = "nccl" if device == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistributedContext(rank, world_size, local_rank, dev, backend)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistributedContext) -> None:
    if ctx.distributed:
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: nn.Module, ctx: DistributedContext) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not ctx.distributed:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.numel():
            dist.broadcast(tensor.data, src=0)


def average_gradients(module: nn.Module, ctx: DistributedContext) -> None:
    """Replace every gradient by its mean over ranks (one flat all-reduce)."""
    if not ctx.distributed:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def all_reduce_sum(tensor: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (returned; the input is left alone)."""
    out = tensor.detach().clone()
    if ctx.distributed:
        dist.all_reduce(out)
    return out
