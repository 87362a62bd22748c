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

__all__ = ["rank_and_size", "all_reduce", "all_gather", "reduce_scatter", "moved_to_max", "gathered_partials",
           "global_sum", "global_logsumexp", "world_gradient", "carried", "stat_dtype"]


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


def all_gather(t: Tensor, group) -> Tensor:
    """The ranks' ``t`` (the same shape on every rank) stacked in rank order, (size, *t.shape); no gradient."""
    if isinstance(group, RankGroup):
        return group.simulated_all_gather(t.detach())
    import torch.distributed._functional_collectives as funcol

    size = rank_and_size(group)[1]
    gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor  # the older name (torch < 2.6)
    out = gather(t.detach().contiguous().reshape(1, *t.shape), 0, group) * 1
    return out.reshape(size, *t.shape)


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
        out.append(carried(t, value))
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


def reduce_scatter(t: Tensor, group) -> Tensor:
    """The sum over the ranks of ``t`` (W * n, ...), this rank's block of n rows; no gradient."""
    rank, size = rank_and_size(group)
    if t.shape[0] % size:
        raise ValueError(f"reduce_scatter needs rows divisible by the group's size {size}, got {t.shape[0]}")
    if isinstance(group, RankGroup):
        n = t.shape[0] // size
        return group.simulated_all_reduce(t.detach(), "sum")[rank * n:(rank + 1) * n]
    import torch.distributed._functional_collectives as funcol

    # reduce_scatter_single: the newer name; reduce_scatter_tensor warns (FutureWarning) from torch 2.13 on
    scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
    return scatter(t.detach().contiguous(), "sum", 0, group) * 1


def moved_to_max(s: Tensor, w: Tensor, m: Tensor, top: Tensor) -> Tensor:
    """``s + w (m - top)``: a sum ``s = sum_j w_j (a_j - m)`` relative to a part's max ``m``, with its weights
    ``w = sum_j w_j``, made relative to the larger max ``top`` (a part without columns, ``w = 0`` and ``m = -inf``,
    moves by 0, not NaN)."""
    return s + torch.where((w > 0) & torch.isfinite(m), w * (m - top), 0.0)


def gathered_partials(m: Tensor, e: Tensor, sums: Sequence[Tensor], *, group,
                      moved: Sequence[tuple[Tensor, Tensor]] = ()) -> tuple:
    """The ranks' row partials combined from one all-gather, in rank order, so every rank computes the same bits:
    ``m`` (N,) the rank's row maxima (-inf: none), ``e`` (N,) its sums of ``exp(a - m)``, ``sums`` more tensors
    added over the ranks, ``moved`` pairs ``(s, w)`` of sums relative to the rank's max with their weights
    (``sum_j w_j (a_j - m)`` and ``sum_j w_j``). Returns ``(M, sum_r e_r exp(m_r - M), [sum_r s_r],
    [(sum_r s_r + w_r (m_r - M), sum_r w_r)])``, in the :func:`stat_dtype`, without gradient (the last item only
    when ``moved`` is given). (The all-reduce combine, one MAX and one SUM, costs less bandwidth at large N; this one
    is bit-identical on every rank whatever the collective's reduction order.)"""
    pairs = [t for pair in moved for t in pair]
    parts = [m, e, *sums, *pairs]
    dtype = stat_dtype(functools.reduce(torch.promote_types, [t.dtype for t in parts]))
    flat = torch.cat([t.detach().to(dtype).reshape(-1) for t in parts])
    every = all_gather(flat, group)  # (W, L)
    out, start = [], 0
    for t in parts:
        out.append(every[:, start:start + t.numel()].reshape(-1, *t.shape))
        start += t.numel()
    ms, es, *rest = out
    top = ms.amax(0)
    finite = torch.isfinite(ms)
    shift = torch.where(finite, torch.exp(ms - torch.where(torch.isfinite(top), top, 0.0)), 0.0)
    totals = [r.sum(0) for r in rest[:len(sums)]]
    moved_out = []
    for k in range(len(moved)):
        s, w = rest[len(sums) + 2 * k], rest[len(sums) + 2 * k + 1]
        moved_out.append((moved_to_max(s, w, ms, top).sum(0), w.sum(0)))
    result = (top, (es * shift).sum(0), totals)
    return (*result, moved_out) if moved else result


def world_gradient(loss: Tensor, size: int) -> Tensor:
    """``loss`` with its gradient multiplied by ``size``: under DDP/FSDP, which average the parameters' gradients over
    the ranks, every rank backpropagating the same global loss from its local inputs then yields the gradient of the
    global loss itself."""
    if size == 1:
        return loss
    return carried(loss, loss.detach(), size)


class _Carried(torch.autograd.Function):
    """``value`` forward, the gradient of ``local`` (times ``scale``) backward."""

    @staticmethod
    def forward(local: Tensor, value: Tensor, scale: float) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.scale = inputs[2]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (grad if ctx.scale == 1 else grad * ctx.scale), None, None


def carried(local: Tensor, value: Tensor, scale: float = 1) -> Tensor:
    """``value`` (a detached tensor of ``local``'s shape and dtype: a global statistic) with the gradient of ``local``
    times ``scale``. Not ``local + (value - local).detach()``: that is NaN where both are infinite (a rank's
    infinite loss: ``inf - inf``)."""
    return _Carried.apply(local, value, scale)
