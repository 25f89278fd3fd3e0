"""Quantizer state across data-parallel ranks.

Gradients of learnable scales are all-reduced with the model's, but observer ranges are buffers updated from
each rank's own batch: left alone they drift apart. ``sync_observer_ranges`` makes every rank use the global
range (min of ``lo``, max of ``hi``) and recompute its qparams; ``state_checksum`` lets ranks verify that their
quantizer state and weights agree.
"""
from typing import List

import torch
import torch.distributed as dist
from torch import nn

from .quantizer import Quantizer


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sync_observer_ranges(model: nn.Module) -> int:
    """All-reduce the ranges of the quantizers that observed this update; returns how many were synced."""
    if not _active():
        return 0
    qs: List[Quantizer] = [m for m in model.modules() if isinstance(m, Quantizer) and m.observing]
    if not qs:
        return 0
    ready = torch.tensor([float(bool(q.initialized)) for q in qs])
    dist.all_reduce(ready, op=dist.ReduceOp.MIN)  # only ranges every rank has (shapes are known then)
    qs = [q for q, r in zip(qs, ready.tolist()) if r > 0]
    if not qs:
        return 0
    lo = torch.cat([q.lo.flatten() for q in qs]).double()
    hi = torch.cat([q.hi.flatten() for q in qs]).double()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    offset = 0
    for q in qs:
        n = q.lo.numel()
        q.lo.copy_(lo[offset:offset + n].view_as(q.lo))
        q.hi.copy_(hi[offset:offset + n].view_as(q.hi))
        q.apply_range()
        offset += n
    return len(qs)


@torch.no_grad()
def state_checksum(model: nn.Module) -> torch.Tensor:
    """Float64 sums of every quantizer tensor and of every parameter: ``[quantizers, parameters]``."""
    qsum = torch.zeros((), dtype=torch.float64)
    for m in model.modules():
        if isinstance(m, Quantizer):
            for t in list(m.buffers(recurse=False)) + list(m.parameters(recurse=False)):
                qsum += t.double().abs().sum().cpu()
    psum = sum((p.double().abs().sum().cpu() for p in model.parameters()), torch.zeros((), dtype=torch.float64))
    return torch.stack([qsum, psum])


def check_ranks_agree(model: nn.Module, rtol: float = 1e-9) -> torch.Tensor:
    """Raise RuntimeError when ranks' quantizer state or weights differ; returns this rank's checksum."""
    mine = state_checksum(model)
    if not _active():
        return mine
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    for rank, other in enumerate(everyone):
        if not torch.allclose(other, everyone[0], rtol=rtol, atol=0.0):
            raise RuntimeError(f"quantizer state differs across ranks: rank 0 {everyone[0].tolist()} vs rank {rank} "
                               f"{other.tolist()} (observer ranges not synchronized?)")
    return mine
