"""The pure-PyTorch definitions of every fastlt loss: the oracle the kernels are tested against.

Runs on any device and dtype (it computes in the logits' dtype, as eager PyTorch would); gradients
come from autograd. Every function validates its arguments and follows ``torch.nn.functional.
cross_entropy`` for ``weight``, ``ignore_index``, ``reduction`` and ``label_smoothing``:

- per row: ``loss_i = (1 - eps) * w_{y_i} * (LSE_j a_ij - a_{i,y_i}) + eps/C * sum_j w_j (LSE_j a_ij - a_ij)``
  (``w = 1`` without weights), times the focal factor ``(1 - p_{i,y_i})^gamma`` with ``p`` detached;
- ignored rows (``y_i == ignore_index``) give 0 and count nowhere;
- ``'mean'`` divides the sum by ``sum_i w_{y_i}`` over the non-ignored rows (NaN for an empty batch,
  as torch), ``'sum'`` sums, ``'none'`` returns the (N,) per-row losses.

All logits-input losses are instances of :func:`adjusted_cross_entropy` (SPEC 2.4):
``a_ij = s * (z_ij + tau*log_pi_j - noise_mul*cloud_j*e_ij - m_i*[j == y_i])``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _validation as V
from .noise import draw_seed, gcl_noise

__all__ = [
    "adjusted_cross_entropy",
    "logit_adjusted_cross_entropy",
    "balanced_softmax_cross_entropy",
    "ldam_cross_entropy",
    "gcl_cross_entropy",
    "lade_loss",
]


def check_operator_args(logits, target, *, prior, tau, cloud, noise_mul, noise, seed, margin, scale,
                        gamma, weight, ignore_index, reduction, label_smoothing) -> None:
    """Validate the arguments of the SPEC 2.4 operator (shared by the reference and kernel paths)."""
    V.check_logits("logits", logits)
    V.check_target(target, logits, ignore_index)
    C = logits.shape[1]
    V.check_finite_float("tau", tau)
    V.check_finite_float("noise_mul", noise_mul)
    V.check_finite_float("scale", scale)
    V.check_finite_float("gamma", gamma, min_value=0.0)
    V.check_finite_float("label_smoothing", label_smoothing, min_value=0.0, max_value=1.0)
    V.check_choice("reduction", reduction, V.REDUCTIONS)
    if prior is not None:
        V.check_class_vector("prior", prior, C, logits.device)
    if cloud is not None:
        V.check_class_vector("cloud", cloud, C, logits.device)
    if weight is not None:
        V.check_class_vector("weight", weight, C, logits.device)
    if margin is not None and not isinstance(margin, torch.Tensor):
        V.check_finite_float("margin", margin)
    elif margin is not None:
        V.check_class_vector("margin", margin, C, logits.device)
    if noise is not None:
        if not isinstance(noise, torch.Tensor) or noise.shape != logits.shape:
            raise ValueError(f"noise must be a tensor of the logits' shape {tuple(logits.shape)}")
        if noise.device != logits.device:
            raise ValueError(f"noise is on {noise.device} but the logits are on {logits.device}")
    if isinstance(seed, torch.Tensor):
        V.check_seed_tensor(seed, logits.device)
    elif seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be a non-negative int or a one-element int64 tensor, got "
                            f"{type(seed).__name__} {seed!r}")
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2^63) (a 64-bit Philox key), got {seed}")


def _row_losses(a: torch.Tensor, target: torch.Tensor, weight, ignore_index: int, label_smoothing: float,
                gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) of the adjusted logits ``a`` and each row's reduction weight (N,)."""
    N, C = a.shape
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = torch.log_softmax(a, dim=1)
    logp_y = logp.gather(1, safe_t[:, None])[:, 0]
    w_row = torch.ones_like(logp_y) if weight is None else weight.to(a.dtype)[safe_t]
    loss = -(1.0 - label_smoothing) * w_row * logp_y
    if label_smoothing > 0:
        smooth = -(logp.sum(1) if weight is None else (logp * weight.to(a.dtype)).sum(1))
        loss = loss + (label_smoothing / C) * smooth
    if gamma != 0:
        p_y = logp_y.detach().exp()
        loss = loss * (1.0 - p_y).clamp(min=0).pow(gamma)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.where(valid, loss, zero), torch.where(valid, w_row, zero)


def _reduce(loss: torch.Tensor, row_weight: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / row_weight.sum()


def _margin_rows(margin, target: torch.Tensor, ignore_index: int, dtype) -> torch.Tensor:
    """(N,) per-row margin ``m_i``: a float for every row, or ``margin[y_i]`` for a (C,) tensor."""
    if isinstance(margin, torch.Tensor):
        safe_t = torch.where(target != ignore_index, target, torch.zeros_like(target)).long()
        return margin.to(dtype)[safe_t]
    value = float(margin)
    if abs(value) > torch.finfo(dtype).max:  # beyond the dtype's range: inf, as arithmetic in it would give
        value = math.copysign(math.inf, value)  # (torch.full raises instead)
    return torch.full(target.shape, value, dtype=dtype, device=target.device)


def adjusted_logits(logits, target, *, prior=None, tau=1.0, cloud=None, noise_mul=0.0, noise=None,
                    seed=None, margin=None, scale=1.0, ignore_index=-100) -> torch.Tensor:
    """``a = s * (z + tau*prior - noise_mul*cloud*e - m_i*onehot(y))`` in the logits' dtype, (N, C)."""
    a = logits
    N, C = logits.shape
    if prior is not None:
        a = a + tau * prior.to(a.dtype)
    if cloud is not None and noise_mul != 0.0:
        if noise is None:
            noise = gcl_noise(draw_seed() if seed is None else int(seed), N, C, logits.device)
        cdt = torch.promote_types(a.dtype, torch.float32)  # float64 stays float64: the oracle is exact
        a = a - (noise_mul * cloud.to(cdt) * noise.to(cdt)).to(a.dtype)
    if margin is not None:
        m = _margin_rows(margin, target, ignore_index, a.dtype)
        valid = target != ignore_index
        safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
        onehot = F.one_hot(safe_t, C).to(a.dtype) * valid[:, None].to(a.dtype)
        a = a - m[:, None] * onehot
    if scale != 1.0:
        a = a * scale
    return a


def adjusted_cross_entropy(logits, target, *, prior=None, tau=1.0, cloud=None, noise_mul=0.0, noise=None,
                           seed=None, margin=None, scale=1.0, gamma=0.0, weight=None, ignore_index=-100,
                           reduction="mean", label_smoothing=0.0) -> torch.Tensor:
    """The one operator of SPEC 2.4 on (N, C) logits and (N,) targets.

    ``prior``: (C,) log prior (the offset is ``tau * prior``); ``cloud``: (C,) normalised cloud sizes
    (``sigma_j = noise_mul * cloud_j``); ``noise``: optional (N, C) noise ``e`` (else drawn from
    ``seed``, else from torch's generator); ``margin``: float or (C,) per-class target margin;
    ``scale``: ``s``; ``gamma``: focal exponent (``p_y`` detached).
    """
    target = V.as_index_target(target, keep_int32=False)
    check_operator_args(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul, noise=noise,
                        seed=seed, margin=margin, scale=scale, gamma=gamma, weight=weight,
                        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing)
    a = adjusted_logits(logits, target, prior=prior, tau=tau, cloud=cloud, noise_mul=noise_mul, noise=noise,
                        seed=seed, margin=margin, scale=scale, ignore_index=ignore_index)
    loss, row_w = _row_losses(a, target, weight, ignore_index, label_smoothing, gamma)
    return _reduce(loss, row_w, reduction)


def logit_adjusted_cross_entropy(logits, target, log_prior, tau=1.0, *, weight=None, ignore_index=-100,
                                 reduction="mean", label_smoothing=0.0) -> torch.Tensor:
    """Logit-adjusted CE (Menon et al., 2021): ``CE(z + tau * log_pi, y)``; ``log_prior`` is (C,)."""
    return adjusted_cross_entropy(logits, target, prior=log_prior, tau=tau, weight=weight,
                                  ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)


def balanced_softmax_cross_entropy(logits, target, log_prior, *, weight=None, ignore_index=-100,
                                   reduction="mean", label_smoothing=0.0) -> torch.Tensor:
    """Balanced Softmax (Ren et al., 2020) = logit-adjusted CE with tau = 1."""
    return logit_adjusted_cross_entropy(logits, target, log_prior, 1.0, weight=weight,
                                        ignore_index=ignore_index, reduction=reduction,
                                        label_smoothing=label_smoothing)


def ldam_cross_entropy(logits, target, margins, s=30.0, *, weight=None, ignore_index=-100,
                       reduction="mean", label_smoothing=0.0) -> torch.Tensor:
    """LDAM (Cao et al., 2019): ``CE(s * (z - m_y * onehot(y)), y)``; ``margins`` (C,) from ``ldam_margins``."""
    V.check_finite_float("s", s)
    return adjusted_cross_entropy(logits, target, margin=margins, scale=s, weight=weight,
                                  ignore_index=ignore_index, reduction=reduction,
                                  label_smoothing=label_smoothing)


def gcl_cross_entropy(cosine, target, cloud, m=0.5, s=30.0, noise_mul=1.0, gamma=0.0, *, seed=None, noise=None,
                      weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0) -> torch.Tensor:
    """GCL (Li et al., 2022) on (N, C) cosine logits: ``CE(s * (cos - noise_mul*cloud*e - m*onehot(y)), y)``.

    ``cloud``: (C,) from ``gcl_cloud``; ``e`` the half-normal noise of ``fastlt.noise.gcl_noise`` for
    ``seed`` (drawn from torch's generator when None) unless ``noise`` is given. ``gamma > 0`` applies
    the focal factor of the classifier re-training stage.
    """
    V.check_finite_float("m", m)
    V.check_finite_float("s", s)
    return adjusted_cross_entropy(cosine, target, cloud=cloud, noise_mul=noise_mul, noise=noise, seed=seed,
                                  margin=m, scale=s, gamma=gamma, weight=weight, ignore_index=ignore_index,
                                  reduction=reduction, label_smoothing=label_smoothing)


def check_lade_args(logits, target, prior, alpha, remine_lambda, reduction) -> None:
    V.check_logits("logits", logits)
    V.check_class_vector("prior", prior, logits.shape[1], logits.device)
    V.check_finite_float("alpha", alpha)
    V.check_finite_float("remine_lambda", remine_lambda)
    if reduction == "none":
        raise ValueError("reduction='none' is not defined for LADELoss: its LADER term is a batch-level "
                         "statistic; use 'mean' or 'sum'")


def lader(logits, target, prior, remine_lambda=0.1, ignore_index=-100) -> torch.Tensor:
    """LADE's regulariser as the official code computes it (SPEC 2.3), a scalar.

    ``first_c = sum_{i: y_i=c} z_ic / (N_c + 1e-8)``,
    ``second_c = LSE_i(z_ic - log(pi_c + 1e-9) + log(1/C + 1e-9)) - log N``,
    ``LADER = -sum_c pi_c * (first_c - second_c - remine_lambda * second_c^2)``, 0 for an empty batch.
    Computed in at least float32 (fp16 cannot represent the 1e-8 / 1e-9 epsilons), returned in the
    logits' dtype.
    """
    N, C = logits.shape
    target = V.as_index_target(target, keep_int32=False)
    out_dtype = logits.dtype
    # half precision cannot hold the official epsilons (1e-8 underflows in fp16: 0/0 for absent classes)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
    dt = logits.dtype
    onehot = F.one_hot(safe_t, C).to(dt) * valid[:, None].to(dt)
    n_c = onehot.sum(0)
    first = (logits * onehot).sum(0) / (n_c + 1e-8)
    pi = prior.to(dt)
    shifted = logits - torch.log(pi + 1e-9) + math.log(1.0 / C + 1e-9)
    shifted = torch.where(valid[:, None], shifted, torch.full_like(shifted, -math.inf))
    n_valid = valid.sum().to(dt)
    second = torch.logsumexp(shifted, dim=0) - torch.log(n_valid)
    est = first - second - remine_lambda * second.pow(2)
    value = -(pi * est).sum()
    return torch.where(n_valid > 0, value, torch.zeros_like(value)).to(out_dtype)


def lade_loss(logits, target, prior, alpha=0.1, remine_lambda=0.1, *, weight=None, ignore_index=-100,
              reduction="mean", label_smoothing=0.0) -> torch.Tensor:
    """LADE (Hong et al., 2021): ``PriorCE(z) + alpha * LADER(z)``, ``prior`` = (C,) training prior pi.

    PriorCE is logit-adjusted CE with tau = 1 and ``log(pi)`` (reduced by ``reduction``: 'mean' or
    'sum'); LADER as in :func:`lader`.
    """
    target = V.as_index_target(target, keep_int32=False)
    check_lade_args(logits, target, prior, alpha, remine_lambda, reduction)
    prior_ce = adjusted_cross_entropy(logits, target, prior=torch.log(prior), tau=1.0, weight=weight,
                                      ignore_index=ignore_index, reduction=reduction,
                                      label_smoothing=label_smoothing)
    return prior_ce + alpha * lader(logits, target, prior, remine_lambda, ignore_index)
