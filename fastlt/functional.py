"""The losses as functions, with a ``backend`` switch: ``'torch'`` runs :mod:`fastlt.reference`, ``'triton'`` the fused
kernels, ``'auto'`` (default) the kernels for CUDA tensors (not float64) and the reference elsewhere. Signatures match
:mod:`fastlt.reference`, plus ``backend`` and, for the adjusted cross-entropy, ``grad_in_forward`` (compute the
gradient inside the forward and store it over the logits: no extra memory, but the caller's logits tensor is
overwritten; see :func:`adjusted_cross_entropy`). The fused heads' functions (features in) are here too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _validation as V
from . import reference as R
from ._backend import use_triton
from ._operator import gcl_fields, la_fields, ldam_fields
from ._shapes import as_rows, restore
from .distributed.class_parallel import check_shard_options, sharded_cross_entropy, sharded_lade_loss
from .distributed.data_parallel import (
    global_batch_loss,
    global_lade_loss,
    resolve_dp_group,
    split_warning,
    warn_without_group,
)
from .distributed.dtensor import from_dtensor, is_dtensor
from .heads.functional import cosine_cross_entropy, lade_linear_loss, linear_cross_entropy

__all__ = [
    "adjusted_cross_entropy",
    "logit_adjusted_cross_entropy",
    "balanced_softmax_cross_entropy",
    "ldam_cross_entropy",
    "gcl_cross_entropy",
    "lade_loss",
    "linear_cross_entropy",
    "cosine_cross_entropy",
    "lade_linear_loss",
    "use_triton",
]


def adjusted_cross_entropy(logits: Tensor, target: Tensor, *, log_prior: Tensor | None = None, tau: float = 1.0,
                           cloud: Tensor | None = None, noise_mul: float = 0.0, noise: Tensor | None = None,
                           seed: int | Tensor | None = None, margin: float | Tensor | None = None,
                           scale: float = 1.0, gamma: float = 0.0, weight: Tensor | None = None,
                           ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                           backend: str = "auto", grad_in_forward: bool = False, dp_group=None,
                           rows_per_rank: int | None = None, shard=None, prior: Tensor | None = None) -> Tensor:
    """The adjusted cross-entropy, every logits-input loss of fastlt (docs/design.md, "The operator"):
    ``a_ij = s * (z_ij + tau*log_prior_j - noise_mul*cloud_j*e_ij - m_i*[j == y_i])``, then cross-entropy with
    class weights, label smoothing and a focal factor.

    Args:
        logits: (N, C) fp32, bf16 or fp16 (float64: ``backend='torch'`` only); or (C,) unbatched, or
            (N, C, d1, ..., dk) with the positions as rows, as ``F.cross_entropy`` (:mod:`fastlt._shapes`).
        target: (N,) integer class indices, or ``ignore_index`` ((), (N, d1, ..., dk) for the shapes above); or
            class probabilities of the logits' shape, any float dtype (mixup; see
            :func:`fastlt.reference.adjusted_cross_entropy`).
        log_prior, tau, cloud, noise_mul, noise, margin, scale, gamma, weight, ignore_index, reduction,
            label_smoothing: as :func:`fastlt.reference.adjusted_cross_entropy` (``noise`` on the reference only).
        seed: GCL's noise seed: an int, or a one-element int64 tensor on the logits' device, which the kernels read
            from device memory (a CUDA graph that redraws it in place, e.g. ``seed_t.random_(0, 2**62)``, gets fresh
            noise on every replay; an int is baked into the graph). None draws one from torch's CPU generator (the
            reference path draws the same); under ``torch.compile`` the draw is an op of the graph instead, so every
            call of the compiled graph gets fresh noise without a graph break.
        backend: 'auto', 'triton' or 'torch'.
        grad_in_forward: (Triton only) compute d loss / d logits in the forward and write it over ``logits``, which
            must then be a non-leaf tensor you no longer need; the backward only rescales it by ``grad_output``
            (skipped, on the GPU, when that is 1).
        dp_group: a ``torch.distributed`` process group over which the batch is split (data parallel): the loss of
            the global batch on every rank, gradients scaled for DDP's averaging (:mod:`fastlt.distributed`). None:
            this rank's rows only (warns once under several ranks when the result depends on the split: a
            class-weighted mean); False: the same, without the warning. ``'world'``: the default group, looked up
            at each call (``dist.group.WORLD`` is None before ``init_process_group``, so a loss made earlier with
            it held None: no group).
        rows_per_rank: with ``dp_group``, the per-rank batch size: rank r's rows draw GCL noise rows
            ``r * rows_per_rank + i`` (default: this rank's row count, right when the ranks' batches are equal).
        shard: a :class:`fastlt.distributed.ClassShard` (class parallel): ``logits`` are this rank's columns
            (N, shard.size), ``target`` the global class ids of all N rows (the same on every rank of the shard's
            group), the class vectors full (C,); the loss of the full logits, the same on every rank, with the
            gradient of the local columns (two all-reduces forward, none backward: :mod:`fastlt.distributed`).
            ``logits`` may instead be a DTensor sharded ``Shard(-1)`` on a 1-D mesh (the shard is read off it;
            :mod:`fastlt.distributed.dtensor`).
        prior: refused (a ``TypeError``): the old name of ``log_prior``; 'prior' means pi in fastlt.

    Returns:
        The loss in the logits' dtype (float32 under ``torch.autocast``, as ``nn.CrossEntropyLoss``'s): 0-dim, or
        the targets' shape for ``reduction='none'``.
    """
    dp_group = resolve_dp_group(dp_group)
    log_prior = V.refuse_old_name("log_prior", log_prior, "prior", prior)
    fields = dict(log_prior=log_prior, tau=tau, cloud=cloud, noise_mul=noise_mul, seed=seed, margin=margin,
                  scale=scale, gamma=gamma, weight=weight, ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    logits, target, shard = _dtensor_shard(logits, target, shard)
    rows = as_rows(logits, target)
    if rows.shape is not None:  # (C,) or (N, C, d1, ...): the positions as rows, the result in the targets' shape
        return restore(adjusted_cross_entropy(rows.logits, rows.target, **fields, noise=noise, backend=backend,
                                              grad_in_forward=grad_in_forward, dp_group=dp_group,
                                              rows_per_rank=rows_per_rank, shard=shard), rows)
    triton = use_triton(backend, logits)
    if shard is not None:
        check_shard_options(dp_group, noise=noise, grad_in_forward=grad_in_forward)
        return sharded_cross_entropy(logits, target, fields, shard, triton=triton)
    if grad_in_forward and not triton:
        raise ValueError("grad_in_forward=True needs the Triton backend (CUDA tensors)")

    def local(f: dict) -> Tensor:
        if not triton:
            return R.adjusted_cross_entropy(logits, target, noise=noise, **f)
        return _glue().adjusted_cross_entropy_triton(logits, target, f, noise=noise, grad_in_forward=grad_in_forward)

    if dp_group is None and (warning := split_warning(weight, reduction)) is not None:
        warn_without_group(warning)
    if dp_group is not None and dp_group is not False:
        return global_batch_loss(local, logits, target, fields, dp_group, weight=weight, rows_per_rank=rows_per_rank)
    return local(fields)


def _kernels_call(logits: Tensor, target: Tensor, fields: dict, *, grad_in_forward: bool = False,
                  cache=None) -> Tensor:
    """The adjusted cross-entropy on the kernels for a call that
    :func:`fastlt.distributed.data_parallel.kernels_direct` accepts; ``fields``: the operator's parameters by name
    (:class:`fastlt._operator.AdjustedCEArgs`; ``seed`` may be None: drawn); ``cache``: the caller's
    :class:`fastlt._operator.ArgsCache` (a module's own), else the glue's shared one."""
    return _glue().adjusted_cross_entropy_triton(logits, target, fields, grad_in_forward=grad_in_forward, cache=cache)


def _lade_kernels_call(logits: Tensor, target: Tensor, fields: dict, cache=None) -> Tensor:
    """LADE on the kernels for a call that :func:`fastlt.distributed.data_parallel.kernels_direct` accepts;
    ``fields``: :func:`lade_loss`'s prior, alpha, remine_lambda, weight, ignore_index, reduction and label_smoothing
    by name; ``cache`` as :func:`_kernels_call`."""
    return _glue().lade_fields_triton(logits, target, fields, cache)


_GLUE = None


def _glue():
    """:mod:`fastlt._glue` (the kernels' autograd), imported at the first call that runs the kernels (importing it
    imports triton); then a global's lookup, not an import statement per call."""
    if torch.compiler.is_compiling():
        # no global read (nor set: see fastlt._backend.kernels_available) while tracing: a trace before the first
        # eager call guarded on `_GLUE is None`, which that call then broke (one more compile of the step)
        from . import _glue as glue

        return glue
    global _GLUE
    if _GLUE is None:
        from . import _glue as glue

        _GLUE = glue
    return _GLUE


def _dtensor_shard(logits, target, shard):
    """A class-sharded DTensor's local columns and shard (:mod:`fastlt.distributed.dtensor`); else unchanged."""
    if not is_dtensor(logits):
        return logits, target, shard
    if shard is not None:
        raise ValueError("shard= is read off a DTensor's layout: pass DTensor logits or shard=, not both")
    return from_dtensor(logits, target)


def logit_adjusted_cross_entropy(logits: Tensor, target: Tensor, log_prior: Tensor, tau: float = 1.0, *,
                                 weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0, backend: str = "auto",
                                 grad_in_forward: bool = False, dp_group=None, shard=None) -> Tensor:
    """``CE(z + tau * log_prior, y)`` (Menon et al., 2021); ``log_prior`` (C,) from ``fastlt.priors``; the other
    arguments as :func:`adjusted_cross_entropy`."""
    return adjusted_cross_entropy(logits, target, **la_fields(log_prior, tau), weight=weight,
                                  ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                  backend=backend, grad_in_forward=grad_in_forward, dp_group=dp_group, shard=shard)


def balanced_softmax_cross_entropy(logits: Tensor, target: Tensor, log_prior: Tensor, *,
                                   weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                                   label_smoothing: float = 0.0, backend: str = "auto",
                                   grad_in_forward: bool = False, dp_group=None, shard=None) -> Tensor:
    """Balanced Softmax (Ren et al., 2020): logit-adjusted CE with tau = 1."""
    return logit_adjusted_cross_entropy(logits, target, log_prior, 1.0, weight=weight, ignore_index=ignore_index,
                                        reduction=reduction, label_smoothing=label_smoothing, backend=backend,
                                        grad_in_forward=grad_in_forward, dp_group=dp_group, shard=shard)


def ldam_cross_entropy(logits: Tensor, target: Tensor, margins: Tensor, s: float = 30.0, *,
                       weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                       label_smoothing: float = 0.0, backend: str = "auto", grad_in_forward: bool = False,
                       dp_group=None, shard=None) -> Tensor:
    """LDAM: ``CE(s * (z - margins[y] * onehot(y)), y)``; ``margins`` (C,) from ``fastlt.priors.ldam_margins``."""
    return adjusted_cross_entropy(logits, target, **ldam_fields(margins, s), weight=weight,
                                  ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                  backend=backend, grad_in_forward=grad_in_forward, dp_group=dp_group, shard=shard)


def gcl_cross_entropy(cosine: Tensor, target: Tensor, cloud: Tensor, m: float = 0.5, s: float = 30.0,
                      noise_mul: float = 1.0, gamma: float = 0.0, *, seed: int | Tensor | None = None,
                      noise: Tensor | None = None, weight: Tensor | None = None, ignore_index: int = -100,
                      reduction: str = "mean", label_smoothing: float = 0.0, backend: str = "auto",
                      grad_in_forward: bool = False, dp_group=None, rows_per_rank: int | None = None,
                      shard=None) -> Tensor:
    """GCL on (N, C) cosine logits; see :func:`fastlt.reference.gcl_cross_entropy`. Noise follows ``seed``
    (drawn from torch's generator when None), the same numbers on every backend. ``dp_group``, ``rows_per_rank``:
    as :func:`adjusted_cross_entropy` (rank r's rows draw noise rows ``r * rows_per_rank + i``)."""
    return adjusted_cross_entropy(cosine, target, **gcl_fields(cloud, m, s, noise_mul, gamma), noise=noise,
                                  seed=seed, weight=weight, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing, backend=backend, grad_in_forward=grad_in_forward,
                                  dp_group=dp_group, rows_per_rank=rows_per_rank, shard=shard)


def lade_loss(logits: Tensor, target: Tensor, prior: Tensor, alpha: float = 0.1, remine_lambda: float = 0.1, *,
              weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
              label_smoothing: float = 0.0, backend: str = "auto", dp_group=None, shard=None) -> Tensor:
    """LADE: ``PriorCE(z) + alpha * LADER(z)``; ``prior`` (C,) is pi (see :func:`fastlt.reference.lade_loss`).

    ``dp_group``: LADER's column statistics (and PriorCE's mean) over the global batch of the data-parallel group,
    as the official code's single-process ``nn.DataParallel`` computed them (one MAX and one SUM all-reduce of
    ~12 C bytes; see :func:`adjusted_cross_entropy`). None warns once under several ranks. Shaped inputs as
    :func:`adjusted_cross_entropy` (positions are rows, for LADER's statistics too)."""
    dp_group = resolve_dp_group(dp_group)
    logits, target, shard = _dtensor_shard(logits, target, shard)
    rows = as_rows(logits, target)
    logits, target = rows.logits, rows.target
    if shard is not None:  # class parallel: the reference's arithmetic (backend='triton' is refused)
        check_shard_options(dp_group, lade_backend=backend)
        return sharded_lade_loss(logits, target, prior, alpha, remine_lambda, shard, weight=weight,
                                 ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    if dp_group is not None and dp_group is not False:
        return global_lade_loss(logits, target, prior, alpha, remine_lambda, dp_group, weight=weight,
                                ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                                triton=use_triton(backend, logits))
    if dp_group is None:
        warn_without_group("LADELoss / lade_loss")
    if not use_triton(backend, logits):
        return R.lade_loss(logits, target, prior, alpha, remine_lambda, weight=weight, ignore_index=ignore_index,
                           reduction=reduction, label_smoothing=label_smoothing)
    return _glue().lade_loss_triton(logits, target, prior, alpha, remine_lambda, weight=weight,
                                    ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
