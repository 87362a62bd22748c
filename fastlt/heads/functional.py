"""The fused heads as functions: features in, loss out, never the (N, C) logits (docs/design.md, "Fused heads").

``backend='auto'`` (default) runs the fused kernels for CUDA tensors (not float64) and the reference
(:mod:`fastlt.reference`: the dense logits, then the loss) elsewhere; ``'triton'`` / ``'torch'`` force one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .. import _validation as V
from .. import reference as R
from .._backend import autocast_inputs, use_triton
from ..distributed.class_parallel import check_shard_options
from ..distributed.data_parallel import (
    global_batch_loss,
    global_lade_loss,
    resolve_dp_group,
    split_warning,
    warn_without_group,
)
from ..distributed.sharded_heads import sharded_head_loss

__all__ = ["linear_cross_entropy", "cosine_cross_entropy", "lade_linear_loss"]


def linear_cross_entropy(features: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         log_prior: Tensor | None = None, tau: float = 1.0, margin: float | Tensor | None = None,
                         scale: float = 1.0, cloud: Tensor | None = None, noise_mul: float = 0.0,
                         seed: int | Tensor | None = None, noise: Tensor | None = None, gamma: float = 0.0,
                         weight_classes: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, backend: str = "auto", chunk_rows: int | None = None,
                         chunk_classes: int | None = None, dp_group=None, rows_per_rank: int | None = None,
                         shard=None, gather_inputs: bool = True, features_grad_scale: float | None = None,
                         prior: Tensor | None = None) -> Tensor:
    """The adjusted cross-entropy on the logits of a linear layer, ``z = features @ weight^T + bias``, without
    holding the (N, C) logits.

    Args:
        features: (N, D) fp32, bf16 or fp16 (float64: ``backend='torch'`` only).
        weight: (C, D), the features' dtype and device.
        target: (N,) integer class indices, or ``ignore_index``; or (N, C) class probabilities (mixup), as
            :func:`fastlt.functional.adjusted_cross_entropy`.
        bias: (C,) or None.
        log_prior, tau, margin, scale, cloud, noise_mul, seed, gamma, ignore_index, reduction, label_smoothing: the
            operator's parameters, as :func:`fastlt.functional.adjusted_cross_entropy`.
        noise: (N, C) explicit noise, reference path only.
        weight_classes: (C,) class weights of the loss.
        backend: 'auto', 'triton' or 'torch'.
        chunk_rows: rows per chunk of the row-chunked path (default: :func:`fastlt.heads.plan.head_chunk_rows`: the
            whole batch when its logits fit in 512 MiB plus the fp32 dW accumulator that row chunks need, else a
            <= 512 MiB buffer).
        chunk_classes: classes per chunk of the class-chunked path (a multiple of 8). By default the path is picked
            by count (:func:`fastlt.heads.plan.prefer_class_chunks`: class chunks when the batch takes several row
            chunks and C is so large that they would re-read an fp32 dW accumulator many times).
        dp_group, rows_per_rank: data parallel, the loss of the global batch (as
            :func:`fastlt.functional.adjusted_cross_entropy`).
        shard: a :class:`fastlt.distributed.ClassShard` (class parallel): ``weight`` (shard.size, D) and ``bias``
            (shard.size,) are this rank's rows, the class vectors full (C,) (:mod:`fastlt.distributed.sharded_heads`;
            the rank's (rows, shard.size) logits are formed).
        gather_inputs: with ``shard``, True (default): all-gather every rank's features and targets (the loss of the
            gathered batch; the features' gradient reduce-scattered back, times ``features_grad_scale``, default
            the group's size for a DDP backbone); False: the features are replicated on the group.
        prior: refused (a ``TypeError``): the old name of ``log_prior``; 'prior' means pi in fastlt.

    Returns:
        The loss in the features' dtype (float32 under ``torch.autocast``, as ``nn.CrossEntropyLoss``'s): 0-dim, or
        (N,) for ``reduction='none'``.
    """
    dp_group = resolve_dp_group(dp_group)
    V.check_chunks(chunk_rows, chunk_classes)
    log_prior = V.refuse_old_name("log_prior", log_prior, "prior", prior)
    fields = dict(log_prior=log_prior, tau=tau, margin=margin, scale=scale, cloud=cloud, noise_mul=noise_mul,
                  seed=seed, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    triton = use_triton(backend, features)
    if shard is not None:
        _check_shard_head(dp_group, noise, chunk_rows, chunk_classes)
        return sharded_head_loss(features, weight, bias, target, shard, fields=dict(fields, weight=weight_classes),
                                 gather_inputs=gather_inputs, features_grad_scale=features_grad_scale, triton=triton)

    def local(f: dict) -> Tensor:
        if not triton:  # (under autocast in its dtype, as nn.Linear and the kernels' path run)
            x, w, b, _ = autocast_inputs(features, weight, bias)
            return R.reference_linear_cross_entropy(x, w, target, b, noise=noise, weight_classes=weight_classes, **f)
        from .glue import run_head

        return run_head(features, weight, bias, target, dict(f, weight=weight_classes), cosine=False, eps=0.0,
                        chunk_rows=chunk_rows, chunk_classes=chunk_classes, noise=noise)

    return _data_parallel(local, features, target, fields, weight_classes, dp_group, rows_per_rank)


def cosine_cross_entropy(features: Tensor, weight: Tensor, target: Tensor, *, log_prior: Tensor | None = None,
                         tau: float = 1.0, margin: float | Tensor | None = None, scale: float = 1.0,
                         cloud: Tensor | None = None, noise_mul: float = 0.0, seed: int | Tensor | None = None,
                         noise: Tensor | None = None, gamma: float = 0.0, weight_classes: Tensor | None = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         backend: str = "auto", chunk_rows: int | None = None, chunk_classes: int | None = None,
                         eps: float = 1e-12, dp_group=None, rows_per_rank: int | None = None, shard=None,
                         gather_inputs: bool = True, features_grad_scale: float | None = None,
                         prior: Tensor | None = None) -> Tensor:
    """As :func:`linear_cross_entropy` (no bias) on cosine logits ``cos_ij = <f_i/|f_i|, w_j/|w_j|>``: rows of
    ``features`` and ``weight`` are L2-normalised (norms once, in fp32, clamped at ``eps`` as ``F.normalize``) and
    the gradient flows through the normalisation. GCL is ``cloud=gcl_cloud(counts), noise_mul, margin=m,
    scale=s`` (see :class:`fastlt.CosineGCLHead`). ``dp_group``, ``rows_per_rank``, ``shard``, ``gather_inputs``,
    ``features_grad_scale``: as :func:`linear_cross_entropy` (GCL's noise rows are the gathered batch's)."""
    dp_group = resolve_dp_group(dp_group)
    V.check_chunks(chunk_rows, chunk_classes)
    V.check_finite_float("eps", eps, min_value=0.0, min_inclusive=False)
    log_prior = V.refuse_old_name("log_prior", log_prior, "prior", prior)
    fields = dict(log_prior=log_prior, tau=tau, margin=margin, scale=scale, cloud=cloud, noise_mul=noise_mul,
                  seed=seed, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    triton = use_triton(backend, features)
    if shard is not None:
        _check_shard_head(dp_group, noise, chunk_rows, chunk_classes)
        return sharded_head_loss(features, weight, None, target, shard, fields=dict(fields, weight=weight_classes),
                                 cosine=True, eps=eps, gather_inputs=gather_inputs,
                                 features_grad_scale=features_grad_scale, triton=triton)

    def local(f: dict) -> Tensor:
        if not triton:  # (under autocast in its dtype, as the kernels' path runs)
            x, w, _, _ = autocast_inputs(features, weight, None)
            return R.reference_cosine_cross_entropy(x, w, target, noise=noise, eps=eps, weight_classes=weight_classes,
                                                    **f)
        from .glue import run_head

        return run_head(features, weight, None, target, dict(f, weight=weight_classes), cosine=True, eps=eps,
                        chunk_rows=chunk_rows, chunk_classes=chunk_classes, noise=noise)

    return _data_parallel(local, features, target, fields, weight_classes, dp_group, rows_per_rank)


def _check_shard_head(dp_group, noise, chunk_rows, chunk_classes, lade_backend: str | None = None) -> None:
    check_shard_options(dp_group, noise=noise, lade_backend=lade_backend)
    if chunk_rows is not None or chunk_classes is not None:
        raise ValueError("chunk_rows / chunk_classes do not apply with shard= (the rank's logits are formed)")


def _data_parallel(local, features: Tensor, target: Tensor, fields: dict, weight_classes, dp_group,
                   rows_per_rank) -> Tensor:
    """``local(fields)`` on this rank's rows, or, with ``dp_group``, the loss of the global batch."""
    if dp_group is None and (warning := split_warning(weight_classes, fields["reduction"])) is not None:
        warn_without_group(warning)
    if dp_group is None or dp_group is False:
        return local(fields)
    return global_batch_loss(local, features, target, fields, dp_group, weight=weight_classes,
                             rows_per_rank=rows_per_rank)


def lade_linear_loss(features: Tensor, weight: Tensor, target: Tensor, prior: Tensor, bias: Tensor | None = None, *,
                     alpha: float = 0.1, remine_lambda: float = 0.1, weight_classes: Tensor | None = None,
                     ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                     backend: str = "auto", chunk_rows: int | None = None,
                     chunk_classes: int | None = None, dp_group=None, shard=None, gather_inputs: bool = True,
                     features_grad_scale: float | None = None) -> Tensor:
    """LADE (Hong et al., CVPR 2021) on ``z = features @ weight^T + bias`` without the (N, C) logits.

    Args:
        features: (N, D); weight: (C, D); bias: (C,) or None; one float dtype.
        target: (N,) integer class indices, or ``ignore_index``; or (N, C) class probabilities (mixup), as
            :func:`fastlt.functional.adjusted_cross_entropy`.
        prior: (C,) training prior pi: non-negative, summing to 1 (checked on the CPU).
        alpha, remine_lambda, weight_classes, ignore_index, label_smoothing: as :func:`fastlt.functional.lade_loss`
            (``weight_classes`` its ``weight``).
        reduction: 'mean' or 'sum'.
        backend, chunk_rows, chunk_classes: as :func:`linear_cross_entropy` (class chunks by default whenever the
            rows would take more than one chunk).
        dp_group: data parallel, LADE of the global batch (:func:`fastlt.functional.lade_loss`). The rank's
            (N_r, C) logits are then formed (one matmul, autograd through it) and the logits loss runs on them: a
            rank's batch is small, and LADER's statistics must be all-reduced between the two passes of the fused
            path.
        shard, gather_inputs, features_grad_scale: class parallel, as :func:`linear_cross_entropy` (LADE's
            reference arithmetic on the rank's logits: ``backend='triton'`` is refused).

    Returns:
        The loss in the features' dtype (float32 under ``torch.autocast``), 0-dim.
    """
    dp_group = resolve_dp_group(dp_group)
    V.check_chunks(chunk_rows, chunk_classes)
    if shard is not None:
        _check_shard_head(dp_group, None, chunk_rows, chunk_classes, lade_backend=backend)
        return sharded_head_loss(features, weight, bias, target, shard, lade=dict(
            prior=prior, alpha=alpha, remine_lambda=remine_lambda, weight=weight_classes, ignore_index=ignore_index,
            reduction=reduction, label_smoothing=label_smoothing), gather_inputs=gather_inputs,
            features_grad_scale=features_grad_scale)
    triton = use_triton(backend, features)
    if not triton or (dp_group is not None and dp_group is not False):  # (the kernels' path casts in its glue)
        features, weight, bias, _ = autocast_inputs(features, weight, bias)
    if dp_group is not None and dp_group is not False:
        V.check_head(features, weight, bias, weight_classes)
        return global_lade_loss(F.linear(features, weight, bias), target, prior, alpha, remine_lambda, dp_group,
                                weight=weight_classes, ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing, triton=triton)
    if dp_group is None:
        warn_without_group("a LADE head")
    if not triton:
        return R.reference_lade_linear_loss(features, weight, target, prior, bias, alpha=alpha,
                                            remine_lambda=remine_lambda, weight_classes=weight_classes,
                                            ignore_index=ignore_index, reduction=reduction,
                                            label_smoothing=label_smoothing)
    from .glue import run_lade_head

    return run_lade_head(features, weight, bias, target, dict(prior=prior, alpha=alpha, remine_lambda=remine_lambda,
                                                              weight=weight_classes, ignore_index=ignore_index,
                                                              reduction=reduction, label_smoothing=label_smoothing),
                         chunk_rows=chunk_rows, chunk_classes=chunk_classes)
