"""Class-parallel heads (``shard=`` on :func:`fastlt.heads.linear_cross_entropy`,
:func:`fastlt.heads.cosine_cross_entropy`, :func:`fastlt.heads.lade_linear_loss` and the head modules): each rank
holds the weight rows of its classes, (shard.size, D), and computes the logits of its classes only, (rows,
shard.size); the sharded logits loss
(:mod:`fastlt.distributed.class_parallel`) finishes the full loss from them (docs/design.md, "Class parallel").

The rows: ``gather_inputs=True`` (a data-parallel backbone, Partial FC's layout): every rank's features (n, D) and
targets (n,) are all-gathered in rank order (every rank passes the same n), the loss is that of the gathered batch
(W n rows, the same on every rank), and the features' gradient is reduce-scattered in fp32 back to the rank's rows,
multiplied by ``features_grad_scale`` (default: the group's size, so that DDP's averaging of the backbone's
gradients gives the gathered batch's gradient; 1.0: the exact gradient of this loss). ``gather_inputs=False``
(replicated features, tensor parallel): every rank passes the same rows; their gradient is summed over the ranks
(:func:`shared_input`).

The rank's logits are formed (one matmul of its classes): (W n, shard.size) per rank, what Partial FC holds too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _operator as O
from .. import _validation as V
from .._backend import autocast_inputs
from ..reference import normalize_rows
from .class_parallel import check_shard_target, sharded_cross_entropy, sharded_lade_loss, shared_input
from .class_shard import ClassShard
from .collectives import all_gather, rank_and_size, reduce_scatter, stat_dtype

__all__ = ["gather_rows", "head_inputs", "sharded_head_loss"]


class _GatherRows(torch.autograd.Function):
    """All-gather of rows forward; reduce-scatter (in fp32 or wider) of the gradient backward, times a scale."""

    @staticmethod
    def forward(ctx, x, group, grad_scale):
        ctx.group, ctx.grad_scale = group, grad_scale
        every = all_gather(x, group)  # (W, n, ...)
        return every.reshape(-1, *x.shape[1:])

    @staticmethod
    def backward(ctx, grad):
        g = reduce_scatter(grad.to(stat_dtype(grad.dtype)), ctx.group)
        if ctx.grad_scale != 1.0:
            g = g * ctx.grad_scale
        return g.to(grad.dtype), None, None


def gather_rows(x: Tensor, group, grad_scale: float = 1.0) -> Tensor:
    """``x`` (n, ...) of every rank of ``group`` concatenated in rank order, (W n, ...); the backward sums the
    gradient over the ranks (in fp32 or wider) and returns this rank's block times ``grad_scale``. Every rank
    passes the same n."""
    return _GatherRows.apply(x, group, float(grad_scale))


def head_inputs(features: Tensor, target: Tensor, shard: ClassShard, *, gather_inputs: bool,
                features_grad_scale: float | None = None) -> tuple[Tensor, Tensor]:
    """The rows every rank of ``shard.group`` computes on: gathered ``(features, target)`` (``gather_inputs``) or
    the replicated ones with a summed gradient (see the module)."""
    if not isinstance(gather_inputs, bool):
        raise TypeError(f"gather_inputs must be a bool, got {type(gather_inputs).__name__}")
    if not gather_inputs:
        if features_grad_scale is not None:
            raise ValueError("features_grad_scale applies to gather_inputs=True only")
        return shared_input(features, shard.group), target
    scale = float(rank_and_size(shard.group)[1]) if features_grad_scale is None else V.check_finite_float(
        "features_grad_scale", features_grad_scale)
    return gather_rows(features, shard.group, scale), all_gather(target, shard.group).reshape(-1, *target.shape[1:])


def _check(features, weight, bias, target, shard: ClassShard) -> None:
    check_shard_target(shard, target)
    V.check_matrix("features", features, "(N, D)")
    V.check_matrix("weight", weight, "(shard.size, D)")
    if weight.shape[0] != shard.size:
        raise ValueError(f"a class-sharded head's weight holds the rows of its classes: ({shard.size}, D) for "
                         f"classes [{shard.start}, {shard.stop}), got {tuple(weight.shape)}")
    if shard.size:
        V.check_head(features, weight, bias)
    elif weight.shape[1] != features.shape[1]:
        raise ValueError(f"weight must have shape (0, {features.shape[1]}), got {tuple(weight.shape)}")


def sharded_head_loss(features: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, shard: ClassShard, *,
                      fields: dict | None = None, lade: dict | None = None, cosine: bool = False, eps: float = 1e-12,
                      gather_inputs: bool = True, features_grad_scale: float | None = None,
                      triton: bool = False) -> Tensor:
    """The loss of a class-sharded head: ``features`` (n, D), ``weight`` (shard.size, D) the rank's rows, ``bias``
    (shard.size,) or None, ``target`` (n,) global class ids. ``fields``: the operator's parameters (full (C,) class
    vectors; :func:`fastlt.distributed.class_parallel.sharded_cross_entropy`), or ``lade``: the keyword arguments of
    :func:`fastlt.distributed.class_parallel.sharded_lade_loss` (prior, alpha, remine_lambda, weight,
    ignore_index, reduction, label_smoothing). ``cosine``: rows of features and weight L2-normalised (``eps``).
    Returns the loss of the rows (gathered or replicated), the same on every rank."""
    features, weight, bias, _ = autocast_inputs(features, weight, bias)  # then F.linear runs as autocast would
    _check(features, weight, bias, target, shard)
    if triton and fields is not None:  # (as the kernels' path says it, in the heads' names)
        O.refuse_requiring_grad(fields, {"weight": "weight_classes"})
    x, y = head_inputs(features, target, shard, gather_inputs=gather_inputs, features_grad_scale=features_grad_scale)
    if cosine:
        z = F.linear(normalize_rows(x, eps), normalize_rows(weight, eps).to(x.dtype))
    else:
        z = F.linear(x, weight, bias)
    if lade is not None:
        return sharded_lade_loss(z, y, shard=shard, **lade)
    return sharded_cross_entropy(z, y, fields, shard, triton=triton)
