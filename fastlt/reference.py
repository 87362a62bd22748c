"""The pure-PyTorch definitions of every fastlt loss: the oracle the kernels are tested against.

Runs on any device and dtype; it computes in at least float32 (float64 stays float64), as the kernels do, and
returns the logits' dtype (16-bit logits summed with a prior offset in their own dtype lost the offset's precision:
bfloat16 logits near 300 are 2 apart); gradients come from autograd. Every function checks its arguments and follows
``torch.nn.functional.cross_entropy`` for ``weight``, ``ignore_index``, ``reduction`` and ``label_smoothing``:

- per row: ``loss_i = (1 - eps) * w_{y_i} * (LSE_j a_ij - a_{i,y_i}) + eps/C * sum_j w_j (LSE_j a_ij - a_ij)``
  (``w = 1`` without weights), times the focal factor ``(1 - p_{i,y_i})^gamma`` with ``p`` detached;
- ignored rows (``y_i == ignore_index``) give 0 and count nowhere;
- ``'mean'`` divides the sum by ``sum_i w_{y_i}`` over the non-ignored rows (NaN for an empty batch, as torch),
  ``'sum'`` sums, ``'none'`` returns the (N,) per-row losses.

Class-probability targets ``q`` (N, C) (mixup, cutmix; as ``F.cross_entropy``'s): ``loss_i = focal_i *
sum_j w_j q'_ij (LSE_j a_ij - a_ij)`` with ``q' = (1 - eps) q + eps/C``; the target margin becomes ``m_j q_ij``
(``m q_ij`` for a float margin); ``focal_i = (1 - sum_j q_ij p_ij)^gamma``; 'mean' divides by N; no row is
ignored. For a one-hot ``q`` each of these is the hard-target term (and 'sum'/'none' the hard-target loss).
LADE's statistics weigh classes by ``q`` (:func:`lader_statistics`).

Every logits-input loss is an instance of :func:`adjusted_cross_entropy`, the adjusted cross-entropy
(docs/design.md, "The operator"): ``a_ij = s * (z_ij + tau*log_prior_j - noise_mul*cloud_j*e_ij - m_i*[j == y_i])``.
The fused heads' oracles (:func:`reference_linear_cross_entropy`, :func:`reference_cosine_cross_entropy`,
:func:`reference_lade_linear_loss`) compute the dense logits first, then the same functions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _validation as V
from ._backend import in_loss_dtype
from ._operator import check_lade_args, check_operator_args, gcl_fields, la_fields, ldam_fields
from ._shapes import as_rows, restore
from .noise import call_seed, gcl_noise

__all__ = [
    "adjusted_cross_entropy",
    "logit_adjusted_cross_entropy",
    "balanced_softmax_cross_entropy",
    "ldam_cross_entropy",
    "gcl_cross_entropy",
    "lade_loss",
    "lader",
    "lader_statistics",
    "lader_from_statistics",
    "LaderStatistics",
    "adjusted_logits",
    "reference_linear_cross_entropy",
    "reference_cosine_cross_entropy",
    "reference_lade_linear_loss",
]


def _without_ignored_rows(a: Tensor, valid: Tensor) -> Tensor:
    """(N, C) ``a`` with the rows not ``valid`` (ignored) set to 0, so that they never reach a softmax and get a 0
    gradient whatever they hold: a row masked whole with -inf would give NaN (``F.cross_entropy``'s softmax
    backward does: 0 * NaN), as the kernels do not. ``a`` itself when every row is valid (checked on the CPU only,
    eagerly: no host sync on a GPU, no data-dependent branch in a compiled graph or a ``torch.func`` transform)."""
    if V.host_readable(valid) and bool(valid.all()):
        return a
    return torch.where(valid[:, None], a, torch.zeros((), dtype=a.dtype, device=a.device))


def focal_power(x: Tensor, gamma: float) -> Tensor:
    """``x ** gamma`` for the focal factor (``x >= 0``, no gradient through it): ``Tensor.pow``, or under
    ``torch.compile`` ``exp(gamma * log x)``, which keeps ``gamma`` an input of the graph (``pow`` of a float made it
    a constant: a gamma schedule compiled the step again at each value)."""
    if torch.compiler.is_compiling():
        return torch.exp(gamma * torch.log(x))
    return x.pow(gamma)


def _row_losses(a: Tensor, target: Tensor, weight, ignore_index: int, label_smoothing: float,
                gamma: float) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) of the adjusted logits ``a`` and each row's reduction weight (N,)."""
    N, C = a.shape
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = torch.log_softmax(_without_ignored_rows(a, valid), dim=1)
    logp_y = logp.gather(1, safe_t[:, None])[:, 0]
    w_row = torch.ones_like(logp_y) if weight is None else weight.to(a.dtype)[safe_t]
    loss = -(1.0 - label_smoothing) * w_row * logp_y
    if label_smoothing > 0:
        smooth = -(logp.sum(1) if weight is None else (logp * weight.to(a.dtype)).sum(1))
        loss = loss + (label_smoothing / C) * smooth
    if gamma != 0:  # 1 - p_y as -expm1(log p_y): exact for a confident row, where 1 - exp(.) cancels
        loss = loss * focal_power((-torch.expm1(logp_y.detach())).clamp(min=0), gamma)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(valid, loss, zero), torch.where(valid, w_row, zero)


def _soft_row_losses(a: Tensor, q: Tensor, weight, label_smoothing: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) for class-probability targets ``q`` (N, C) and each row's reduction weight (1: 'mean'
    divides by N, as ``F.cross_entropy``): ``sum_j w_j q'_ij (LSE_j a_ij - a_ij)`` with ``q' = (1 - eps) q + eps/C``,
    times ``(1 - sum_j q_ij p_ij)^gamma`` (p detached), which is the hard-target loss for a one-hot ``q``."""
    N, C = a.shape
    logp = torch.log_softmax(a, dim=1)
    q = q.to(a.dtype)
    w = torch.ones(C, dtype=a.dtype, device=a.device) if weight is None else weight.to(a.dtype)
    # q' mixed first, as F.cross_entropy: a class masked with -inf and no target mass then gives +inf with smoothing
    # (q' > 0), not 0 * -inf = NaN
    mixed = q if label_smoothing == 0 else (1.0 - label_smoothing) * q + label_smoothing / C
    loss = -(mixed * w * logp).sum(1)
    if gamma != 0:
        p_t = (q * logp.detach().exp()).sum(1)
        loss = loss * focal_power((1.0 - p_t).clamp(min=0), gamma)
    return loss, torch.ones_like(loss)


def _reduce(loss: Tensor, row_weight: Tensor, reduction: str) -> Tensor:
    """The batch's 'sum' or 'mean' of the rows' ``loss``, summed in at least float32 and returned in its dtype, as
    the kernels and CUDA's ``F.cross_entropy`` sum (16-bit rows whose sum overflows but whose mean does not give
    the mean, not inf; CPU PyTorch sums half rows in half)."""
    if reduction == "none":
        return loss
    acc = torch.promote_types(loss.dtype, torch.float32)
    total = loss.sum(dtype=acc)
    if reduction == "mean":
        total = total / row_weight.sum(dtype=acc)
    return total.to(loss.dtype)


def _margin_rows(margin, target: Tensor, ignore_index: int, dtype) -> Tensor:
    """(N,) per-row margin ``m_i``: a float for every row, or ``margin[y_i]`` for a (C,) tensor."""
    if isinstance(margin, Tensor):
        safe_t = torch.where(target != ignore_index, target, torch.zeros_like(target)).long()
        return margin.to(dtype)[safe_t]
    # zeros plus the float: beyond the dtype's range it gives inf, as arithmetic in the dtype would (torch.full
    # raised), and under torch.compile the float stays an input of the graph (torch.full's value, and a range check
    # on it, made it a constant: each new margin of a schedule compiled the step again)
    return torch.zeros(target.shape, dtype=dtype, device=target.device) + margin


def adjusted_logits(logits: Tensor, target: Tensor, *, log_prior: Tensor | None = None, tau: float = 1.0,
                    cloud: Tensor | None = None, noise_mul: float = 0.0, noise: Tensor | None = None,
                    seed: int | Tensor | None = None, margin: float | Tensor | None = None, scale: float = 1.0,
                    ignore_index: int = -100, noise_row_offset: int = 0, prior: Tensor | None = None) -> Tensor:
    """``a = s * (z + tau*log_prior - noise_mul*cloud*e - m_i*onehot(y))`` in the logits' dtype, (N, C); the
    arguments as :func:`adjusted_cross_entropy` (``prior=``, the old name of ``log_prior``, is refused)."""
    log_prior = V.refuse_old_name("log_prior", log_prior, "prior", prior)
    a = logits
    N, C = logits.shape
    if log_prior is not None and tau != 0.0:  # (tau = 0: no offset, even where log_prior is -inf)
        a = a + tau * log_prior.to(a.dtype)
    if cloud is not None and noise_mul != 0.0:
        if noise is None:
            if V.per_sample_rows(logits):
                raise ValueError("GCL's noise is a function of (seed, row, column): under torch.func.vmap of "
                                 "one-row samples every sample is row 0 of a batch of one, so all samples would draw "
                                 "one row's noise, not their rows' in the batch; take per-sample gradients without "
                                 "noise (noise_mul=0), or pass the batch's noise= (drawn with "
                                 "fastlt.noise.gcl_noise) to vmap over")
            noise = gcl_noise(call_seed(seed, logits.device), N, C, logits.device, row_offset=noise_row_offset)
        cdt = torch.promote_types(a.dtype, torch.float32)  # float64 stays float64: the oracle is exact
        a = a - (noise_mul * cloud.to(cdt) * noise.to(cdt)).to(a.dtype)
    if margin is not None and target.is_floating_point():  # class probabilities: m_j * q_ij
        m = margin.to(a.dtype)[None, :] if isinstance(margin, Tensor) else _margin_rows(margin, target[:, 0], 0,
                                                                                         a.dtype)[:, None]
        a = a - m * target.to(a.dtype)
    elif margin is not None:  # a_{i, y_i} - m_i, by one scatter (no (N, C) one-hot: the CPU path's time)
        m = _margin_rows(margin, target, ignore_index, a.dtype)
        valid = target != ignore_index
        safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
        a = a.scatter_add(1, safe_t[:, None], torch.where(valid, -m, torch.zeros_like(m))[:, None])
    if scale != 1.0:
        a = a * scale
    return a


def adjusted_cross_entropy(logits: Tensor, target: Tensor, *, log_prior: Tensor | None = None, tau: float = 1.0,
                           cloud: Tensor | None = None, noise_mul: float = 0.0, noise: Tensor | None = None,
                           seed: int | Tensor | None = None, margin: float | Tensor | None = None,
                           scale: float = 1.0, gamma: float = 0.0, weight: Tensor | None = None,
                           ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                           noise_row_offset: int = 0, prior: Tensor | None = None) -> Tensor:
    """The adjusted cross-entropy on (N, C) logits and (N,) targets (docs/design.md, "The operator").

    Args:
        logits: (N, C) float tensor (any float dtype; computed in at least float32); or (C,) unbatched, or
            (N, C, d1, ..., dk)
            with the positions as rows, as ``F.cross_entropy`` (:mod:`fastlt._shapes`).
        target: (N,) integer class indices, or ``ignore_index`` ((), (N, d1, ..., dk) for the shapes above); or
            class probabilities of the logits' shape (see the module docstring).
        log_prior: (C,) log pi; the offset is ``tau * log_prior``. None: no offset.
        tau: the weight of the prior offset.
        cloud: (C,) normalised cloud sizes (GCL); ``sigma_j = noise_mul * cloud_j``.
        noise_mul: the noise scale (0: no noise).
        noise: (N, C) noise ``e`` to use instead of drawing it from ``seed`` (hand it the kernel's for exact checks).
        seed: the noise seed (int, or a one-element int64 tensor); None draws one from torch's generator.
        margin: the target margin: a float for every row, or (C,) looked up by the target (``m_j q_ij`` for
            class probabilities).
        scale: ``s``, the scale of the adjusted logits.
        gamma: the focal exponent, ``(1 - p_{i,y_i})^gamma`` with ``p`` detached.
        weight, ignore_index, reduction, label_smoothing: as ``F.cross_entropy``.
        noise_row_offset: the global index of row 0: row i draws noise row ``noise_row_offset + i`` (a data-parallel
            rank's rows, see :mod:`fastlt.distributed`).
        prior: refused (a ``TypeError``): the old name of ``log_prior``; 'prior' means pi in fastlt.

    Returns:
        The loss in the logits' dtype: 0-dim, or the targets' shape for ``reduction='none'``. Under
        ``torch.autocast`` half-precision logits are taken in float32 first, as autocast runs ``cross_entropy``.
    """
    log_prior = V.refuse_old_name("log_prior", log_prior, "prior", prior)
    rows = as_rows(logits, target)
    V.check_logits("logits", rows.logits)
    logits, target = in_loss_dtype(rows.logits), V.as_index_target(rows.target, keep_int32=False)
    check_operator_args(logits, target, dict(log_prior=log_prior, tau=tau, cloud=cloud, noise_mul=noise_mul, seed=seed,
                                             margin=margin, scale=scale, gamma=gamma, weight=weight,
                                             ignore_index=ignore_index, reduction=reduction,
                                             label_smoothing=label_smoothing, noise_row_offset=noise_row_offset),
                        noise=noise)
    out_dtype, logits = logits.dtype, logits.to(torch.promote_types(logits.dtype, torch.float32))
    a = adjusted_logits(logits, target, log_prior=log_prior, tau=tau, cloud=cloud, noise_mul=noise_mul, noise=noise,
                        seed=seed, margin=margin, scale=scale, ignore_index=ignore_index,
                        noise_row_offset=noise_row_offset)
    if target.is_floating_point():
        loss, row_w = _soft_row_losses(a, target, weight, label_smoothing, gamma)
    else:
        loss, row_w = _row_losses(a, target, weight, ignore_index, label_smoothing, gamma)
    return restore(_reduce(loss, row_w, reduction).to(out_dtype), rows)


def logit_adjusted_cross_entropy(logits: Tensor, target: Tensor, log_prior: Tensor, tau: float = 1.0, *,
                                 weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                                 label_smoothing: float = 0.0) -> Tensor:
    """Logit-adjusted CE (Menon et al., 2021): ``CE(z + tau * log_prior, y)``; ``log_prior`` is (C,) log pi."""
    return adjusted_cross_entropy(logits, target, **la_fields(log_prior, tau), weight=weight,
                                  ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)


def balanced_softmax_cross_entropy(logits: Tensor, target: Tensor, log_prior: Tensor, *,
                                   weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                                   label_smoothing: float = 0.0) -> Tensor:
    """Balanced Softmax (Ren et al., 2020) = logit-adjusted CE with tau = 1."""
    return logit_adjusted_cross_entropy(logits, target, log_prior, 1.0, weight=weight,
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing)


def ldam_cross_entropy(logits: Tensor, target: Tensor, margins: Tensor, s: float = 30.0, *,
                       weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                       label_smoothing: float = 0.0) -> Tensor:
    """LDAM (Cao et al., 2019): ``CE(s * (z - m_y * onehot(y)), y)``; ``margins`` (C,) from ``ldam_margins``."""
    return adjusted_cross_entropy(logits, target, **ldam_fields(margins, s), weight=weight,
                                  ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)


def gcl_cross_entropy(cosine: Tensor, target: Tensor, cloud: Tensor, m: float = 0.5, s: float = 30.0,
                      noise_mul: float = 1.0, gamma: float = 0.0, *, seed: int | Tensor | None = None,
                      noise: Tensor | None = None, weight: Tensor | None = None, ignore_index: int = -100,
                      reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """GCL (Li et al., 2022) on (N, C) cosine logits: ``CE(s * (cos - noise_mul*cloud*e - m*onehot(y)), y)``.

    ``cloud``: (C,) from ``gcl_cloud``; ``e`` the half-normal noise of ``fastlt.noise.gcl_noise`` for
    ``seed`` (drawn from torch's generator when None) unless ``noise`` is given. ``gamma > 0`` applies
    the focal factor of the classifier re-training stage.
    """
    return adjusted_cross_entropy(cosine, target, **gcl_fields(cloud, m, s, noise_mul, gamma), noise=noise,
                                  seed=seed, weight=weight, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)


class LaderStatistics(NamedTuple):
    """LADER's column statistics of a set of rows (fp32 or wider, (C,) each unless said): what a data-parallel rank
    sums with the other ranks' before :func:`lader_from_statistics` (:mod:`fastlt.distributed`).

    ``col_lse``: ``LSE_i z_ic`` over the valid rows (-inf where there is none); ``target_sum``: ``sum_{i: y_i = c}
    z_ic``; ``count``: ``N_c``; ``valid``: 0-dim, the number of valid rows."""

    col_lse: Tensor
    target_sum: Tensor
    count: Tensor
    valid: Tensor


def _masked_logsumexp(x: Tensor, valid: Tensor) -> Tensor:
    """``LSE_i x_ic`` (``torch.logsumexp``, as the official code) over the rows where ``valid``, (C,); -inf where no
    valid row has a finite logit of the class (no valid row, or the class masked with -inf in each), with a zero
    (not NaN) gradient there."""
    masked = torch.where(valid[:, None], x, torch.full_like(x, -math.inf))
    some = ~(masked == -math.inf).all(0)  # (C,): a NaN column keeps its NaN
    lse = torch.logsumexp(torch.where(some[None, :], masked, torch.zeros_like(x)), dim=0)
    return torch.where(some, lse, torch.full_like(lse, -math.inf))


def _target_sums(logits: Tensor, onehot: Tensor) -> Tensor:
    """(C,) ``sum_i onehot_ic z_ic`` over the entries with weight only: a class masked with -inf in a row that does
    not target it (or an ignored row) adds nothing, where ``-inf * 0`` would make the sum NaN (LADE's kernels sum
    the gathered target logits)."""
    zero = torch.zeros((), dtype=logits.dtype, device=logits.device)
    return torch.where(onehot != 0, logits * onehot, zero).sum(0)


def lader_statistics(logits: Tensor, target: Tensor, ignore_index: int = -100) -> LaderStatistics:
    """The :class:`LaderStatistics` of (N, C) ``logits`` and (N,) ``target``, in at least float32 (differentiable
    in the logits). Class-probability targets ``q`` (N, C) weigh the class sums and counts
    (``N_c = sum_i q_ic``, ``sum_i q_ic z_ic``); every row is valid. Refused for one-row samples under
    ``torch.func.vmap`` (per-sample gradients): a batch of one, whose statistics are not the batch's."""
    if V.per_sample_rows(logits):
        raise ValueError("LADE's regulariser is a statistic of the batch (each class's log-mean-exp over the rows): "
                         "under torch.func.vmap of one-row samples every sample is a batch of one, so a per-sample "
                         "LADE is not the batch's; take its gradient with torch.func.grad (or autograd) over the "
                         "batch")
    C = logits.shape[1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    dt = logits.dtype
    if target.is_floating_point():
        valid = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        onehot = target.to(dt)
    else:
        valid = target != ignore_index
        safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
        onehot = F.one_hot(safe_t, C).to(dt) * valid[:, None].to(dt)
    return LaderStatistics(col_lse=_masked_logsumexp(logits, valid), target_sum=_target_sums(logits, onehot),
                           count=onehot.sum(0), valid=valid.sum().to(dt))


def lader_from_statistics(stats: LaderStatistics, prior: Tensor, remine_lambda: float = 0.1,
                          num_classes: int | None = None) -> Tensor:
    """LADER (0-dim, the statistics' dtype) from the :class:`LaderStatistics` of the whole batch: 0 when no row is
    valid; the formula of :func:`lader`. ``num_classes``: C of ``log(1/C + 1e-9)`` when the statistics (and
    ``prior``) cover a class shard only (the sum is then that shard's part of LADER); default their length."""
    C = stats.col_lse.shape[0] if num_classes is None else num_classes
    dt = stats.col_lse.dtype
    pi = prior.to(dt)
    some = stats.valid > 0
    col_lse = torch.where(torch.isfinite(stats.col_lse), stats.col_lse, torch.zeros_like(stats.col_lse))
    first = stats.target_sum / (stats.count + 1e-8)
    n_valid = torch.where(some, stats.valid, torch.ones_like(stats.valid))
    second = col_lse - torch.log(pi + 1e-9) + math.log(1.0 / C + 1e-9) - torch.log(n_valid)
    est = first - second - remine_lambda * second.pow(2)
    value = -(pi * est).sum()
    return torch.where(some, value, torch.zeros_like(value))


def lader(logits: Tensor, target: Tensor, prior: Tensor, remine_lambda: float = 0.1,
          ignore_index: int = -100) -> Tensor:
    """LADE's regulariser as the official code computes it (docs/design.md, "The losses"), a scalar.

    ``first_c = sum_{i: y_i=c} z_ic / (N_c + 1e-8)``,
    ``second_c = LSE_i(z_ic - log(pi_c + 1e-9) + log(1/C + 1e-9)) - log N``,
    ``LADER = -sum_c pi_c * (first_c - second_c - remine_lambda * second_c^2)``, 0 for an empty batch.
    Computed in at least float32 (fp16 cannot represent the 1e-8 / 1e-9 epsilons), returned in the
    logits' dtype. ``prior`` (C,) is pi. Two phases: :func:`lader_statistics` (sums over rows, which data-parallel
    ranks add up) and :func:`lader_from_statistics`.
    """
    target = V.as_index_target(target, keep_int32=False)
    stats = lader_statistics(logits, target, ignore_index)
    return lader_from_statistics(stats, prior, remine_lambda).to(logits.dtype)


def _log_of_prior(prior: Tensor, dtype: torch.dtype) -> Tensor:
    """PriorCE's offset ``log(pi + 1e-9)`` (the official PriorCELoss's) of a (C,) prior for logits of ``dtype``,
    taken in at least float32 and the logits' dtype (as the kernels take it: a bfloat16 prior's log in bfloat16
    moved LADE's loss by ~3e-3 at 40 classes)."""
    return torch.log(prior.to(torch.promote_types(torch.promote_types(prior.dtype, dtype), torch.float32)) + 1e-9)


def lade_loss(logits: Tensor, target: Tensor, prior: Tensor, alpha: float = 0.1, remine_lambda: float = 0.1, *,
              weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
              label_smoothing: float = 0.0) -> Tensor:
    """LADE (Hong et al., 2021): ``PriorCE(z) + alpha * LADER(z)``.

    Args:
        logits: (N, C) float tensor.
        target: (N,) integer class indices, or ``ignore_index``; or (N, C) class probabilities.
        prior: (C,) the training prior pi: non-negative, summing to 1 (checked on the CPU).
        alpha: the weight of LADER.
        remine_lambda: LADER's quadratic penalty (:func:`lader`).
        weight, ignore_index, label_smoothing: as ``F.cross_entropy`` (PriorCE's).
        reduction: 'mean' or 'sum' (PriorCE's; LADER is a batch statistic).

    PriorCE is logit-adjusted CE with tau = 1 and the official code's offset ``log(pi + 1e-9)``. Shaped inputs as
    :func:`adjusted_cross_entropy` (K-dim positions count as rows of the batch, for LADER too).
    """
    rows = as_rows(logits, target)
    V.check_logits("logits", rows.logits)
    logits, target = in_loss_dtype(rows.logits), V.as_index_target(rows.target, keep_int32=False)
    check_lade_args(logits, target, prior, alpha, remine_lambda, reduction)
    # in at least float32 (as adjusted_cross_entropy), cast back after alpha * LADER (LADER itself may pass fp16's max)
    out_dtype, logits = logits.dtype, logits.to(torch.promote_types(logits.dtype, torch.float32))
    prior_ce = adjusted_cross_entropy(logits, target, log_prior=_log_of_prior(prior, logits.dtype), tau=1.0,
                                      weight=weight, ignore_index=ignore_index, reduction=reduction,
                                      label_smoothing=label_smoothing)
    return (prior_ce + alpha * lader(logits, target, prior, remine_lambda, ignore_index)).to(out_dtype)


# --- the fused heads' oracles: the dense logits, then the losses above ------------------------------------------

def normalize_rows(x: Tensor, eps: float) -> Tensor:
    """``x / max(|x|, eps)`` per row, in at least fp32 (fp64 stays fp64), cast back to ``x``'s dtype.

    The norm of a fp32 row is summed in float64 (MPS, which has none: in fp32), so that rows past ``|x| ~ 1.8e19``
    or below ``~1e-19``, whose squares leave fp32's range, keep their norm where ``F.normalize`` gives 0 or
    ``x / eps``. Autograd saves what ``F.normalize`` saves: ``x`` and the (R, 1) norms.
    """
    xc = x.to(torch.promote_types(x.dtype, torch.float32))
    wide = torch.float64 if xc.device.type != "mps" else xc.dtype
    norm = torch.linalg.vector_norm(xc, dim=1, keepdim=True, dtype=wide).to(xc.dtype)
    return (xc / norm.clamp_min(eps)).to(x.dtype)


def reference_linear_cross_entropy(features: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                                   log_prior: Tensor | None = None, tau: float = 1.0,
                                   margin: float | Tensor | None = None, scale: float = 1.0,
                                   cloud: Tensor | None = None, noise_mul: float = 0.0,
                                   seed: int | Tensor | None = None, noise: Tensor | None = None, gamma: float = 0.0,
                                   weight_classes: Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0,
                                   noise_row_offset: int = 0, prior: Tensor | None = None) -> Tensor:
    """Unfused oracle of the linear head: ``z = features @ weight^T + bias`` (materialises (N, C); gradients by
    autograd), then :func:`adjusted_cross_entropy` on ``z`` with ``weight_classes`` as its class weights."""
    V.check_head(features, weight, bias, weight_classes)
    target = V.as_index_target(target)
    logits = F.linear(features, weight, bias)
    return adjusted_cross_entropy(logits, target, log_prior=log_prior, tau=tau, cloud=cloud, noise_mul=noise_mul,
                                  noise=noise, seed=seed, margin=margin, scale=scale, gamma=gamma,
                                  weight=weight_classes, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing, noise_row_offset=noise_row_offset, prior=prior)


def reference_cosine_cross_entropy(features: Tensor, weight: Tensor, target: Tensor, *,
                                   log_prior: Tensor | None = None, tau: float = 1.0,
                                   margin: float | Tensor | None = None, scale: float = 1.0,
                                   cloud: Tensor | None = None, noise_mul: float = 0.0,
                                   seed: int | Tensor | None = None, noise: Tensor | None = None, gamma: float = 0.0,
                                   weight_classes: Tensor | None = None, ignore_index: int = -100,
                                   reduction: str = "mean", label_smoothing: float = 0.0, eps: float = 1e-12,
                                   noise_row_offset: int = 0, prior: Tensor | None = None) -> Tensor:
    """Unfused oracle of the cosine head: ``cos = normalize(f) @ normalize(W)^T`` (normalised in at least fp32,
    then cast back), then :func:`adjusted_cross_entropy` on ``cos``."""
    V.check_head(features, weight, None, weight_classes)
    V.check_finite_float("eps", eps, min_value=0.0, min_inclusive=False)
    target = V.as_index_target(target)
    cos = F.linear(normalize_rows(features, eps), normalize_rows(weight, eps))
    return adjusted_cross_entropy(cos, target, log_prior=log_prior, tau=tau, cloud=cloud, noise_mul=noise_mul,
                                  noise=noise, seed=seed, margin=margin, scale=scale, gamma=gamma,
                                  weight=weight_classes, ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing, noise_row_offset=noise_row_offset, prior=prior)


def reference_lade_linear_loss(features: Tensor, weight: Tensor, target: Tensor, prior: Tensor,
                               bias: Tensor | None = None, *, alpha: float = 0.1, remine_lambda: float = 0.1,
                               weight_classes: Tensor | None = None, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Unfused oracle of the LADE head: ``z = F.linear(features, weight, bias)``, then :func:`lade_loss`."""
    V.check_head(features, weight, bias, weight_classes)
    target = V.as_index_target(target)
    return lade_loss(F.linear(features, weight, bias), target, prior, alpha, remine_lambda, weight=weight_classes,
                     ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
