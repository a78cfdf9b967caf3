"""Keeping the policy and balancer identical across DDP ranks.

The student is wrapped in ``DistributedDataParallel`` by the user, which
averages *its* gradients. The SPARK policy and the loss balancer live outside
that wrapper, so the distiller keeps them in sync itself:

* at construction, their parameters are broadcast from rank 0;
* before each of their optimiser steps, their gradients are all-reduced
  (averaged over ranks), so every rank takes the same Adam step from the same
  state — the update equals the mean of the per-rank REINFORCE / balancer
  gradients;
* the REINFORCE baseline is updated with the all-reduced mean reward, so it is
  the same number on every rank;
* whether a step is skipped (a non-finite loss on any rank) is decided on all
  ranks together, so none waits in a collective that another skips.

Every rank still samples its own actions (its generator is seeded with
``seed + rank``) and normalises advantages over its own batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import torch
import torch.distributed as dist


def world_size(group: Optional[object] = None) -> int:
    """Number of ranks in ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def rank(group: Optional[object] = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def broadcast_parameters(params: Iterable[torch.Tensor], group: Optional[object] = None) -> None:
    """Copy rank 0's values of ``params`` to every rank (no-op without distributed)."""
    if world_size(group) == 1:
        return
    for p in params:
        with torch.no_grad():
            dist.broadcast(p.data, src=0, group=group)


def average_gradients(params: Iterable[torch.Tensor], group: Optional[object] = None) -> None:
    """Replace each ``p.grad`` by its mean over ranks (missing grads count as zero)."""
    n = world_size(group)
    if n == 1:
        return
    params = list(params)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    # One flat all-reduce rather than one per tensor.
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= n
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
        offset += g.numel()


def average_scalar(value: torch.Tensor, group: Optional[object] = None) -> torch.Tensor:
    """Mean of a 0-D tensor over ranks (returned as a new tensor)."""
    n = world_size(group)
    if n == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, group=group)
    return out / n


def all_ranks(flag: torch.Tensor, group: Optional[object] = None) -> bool:
    """Whether the 0-D bool ``flag`` is True on every rank (one host sync; one all-reduce under DDP), so
    that every rank takes the same branch before the collectives that follow it."""
    if world_size(group) == 1:
        return bool(flag)
    value = flag.detach().to(torch.float32).reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
    return bool(value)


def average_tensors(tensors: list[torch.Tensor], group: Optional[object] = None) -> None:
    """Replace each tensor's values, in place, by their mean over ranks (one flat all-reduce)."""
    n = world_size(group)
    if n == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    flat /= n
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
