"""The collectives of the data-parallel losses, and the autograd rules of a loss that every rank computes over the
global batch (docs/design.md, Scaling past one GPU).

Collectives are torch.distributed's functional collectives (``torch.distributed._functional_collectives``), which
``torch.compile`` traces and which never synchronise with the host; they run in at least fp32 (float64 stays
float64). A loss that every rank computes over the global batch from its local inputs and all-reduced statistics
has, on each rank, the gradient of that one global loss with respect to the rank's own inputs only. The helpers here
keep that gradient exact: :func:`global_sum` and :func:`global_logsumexp` return the global value with the gradient
of the local contribution (the other ranks' contributions are constants there), and :func:`world_gradient`
multiplies the gradient by the group's size, so that DDP's or FSDP's averaging of the parameters' gradients (a sum
over ranks divided by the size) gives exactly the gradient of the global loss.

A :class:`fastlt.distributed.simulate.RankGroup` stands in for a process group in tests (all ranks in one
process).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .simulate import RankGroup

__all__ = ["rank_and_size", "all_reduce", "global_sum", "global_logsumexp", "world_gradient", "stat_dtype"]


def rank_and_size(group) -> tuple[int, int]:
    """``(rank, size)`` of this process in ``group`` (a ``torch.distributed`` process group or a simulated one)."""
    if isinstance(group, RankGroup):
        return group.simulated_rank_and_size()
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and collectives run in: at least fp32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def all_reduce(t: Tensor, op: str, group) -> Tensor:
    """``op`` ('sum' or 'max') of ``t`` over the ranks of ``group``, a new tensor (``t`` is not changed and carries no
    gradient through it)."""
    if isinstance(group, RankGroup):
        return group.simulated_all_reduce(t.detach(), op)
    import torch.distributed._functional_collectives as funcol

    return funcol.all_reduce(t.detach().contiguous(), op, group) * 1  # a plain tensor (waits for the collective)


def global_sum(tensors: Sequence[Tensor], group) -> list[Tensor]:
    """The sums over the ranks of ``tensors`` (any shapes), in one all-reduce (flattened into one buffer, in the
    :func:`stat_dtype` of them all). Each result has the global value and the gradient of its local tensor
    (identity: the other ranks' parts are constants)."""
    dtype = stat_dtype(functools.reduce(torch.promote_types, [t.dtype for t in tensors]))
    local = [t.to(dtype) for t in tensors]
    flat = torch.cat([t.detach().reshape(-1) for t in local])
    total = all_reduce(flat, "sum", group)
    out, start = [], 0
    for t in local:
        value = total[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
        out.append(t + (value - t).detach())
    return out


def global_logsumexp(local_lse: Tensor, group, *more: Tensor) -> tuple[Tensor, list[Tensor]]:
    """``log sum_r exp(lse_r)`` over the ranks of ``group``, elementwise (-inf where every rank has -inf), with the
    gradient of the local ``lse``, ``exp(lse_local - lse_global)`` (0, not NaN, where it is -inf): one MAX and one
    SUM all-reduce. ``more``: further tensors summed over the ranks in the same SUM all-reduce (:func:`global_sum`),
    returned as a list."""
    lse = local_lse.to(stat_dtype(local_lse.dtype))
    top = all_reduce(lse, "max", group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # no rank has a finite value: any shift
    total, *rest = global_sum([torch.exp(lse - top), *more], group)
    some = total > 0
    value = top + torch.log(torch.where(some, total, torch.ones_like(total)))
    return torch.where(some, value, torch.full_like(value, -math.inf)), rest


def world_gradient(loss: Tensor, size: int) -> Tensor:
    """``loss`` with its gradient multiplied by ``size``: under DDP/FSDP, which average the parameters' gradients over
    the ranks, every rank backpropagating the same global loss from its local inputs then yields the gradient of the
    global loss itself."""
    if size == 1:
        return loss
    scaled = loss * size
    return scaled + (loss - scaled).detach()
