"""Post-hoc corrections of a model trained with plain cross-entropy (no retraining); docs/design.md, The losses.

- ``logit_adjust``: ``z - tau * log pi`` (Menon et al., ICLR 2021); ``predict`` takes its argmax.
- ``pc_softmax``: ``softmax(z - log p_s + log p_t)`` for a target prior ``p_t`` (LADE, Hong et al. 2021).
- ``tau_normalize``: classifier rows ``w_j / |w_j|^tau`` (Kang et al., ICLR 2020).

Priors are computed from counts in float64 on the CPU and cast to the logits' dtype and device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ._validation import (
    FLOAT_DTYPES,
    PRIOR_SUM_TOLERANCE,
    as_class_counts,
    as_cpu_tensor,
    check_class_vector,
    check_finite_float,
    check_logits,
    check_num_classes,
)
from .priors import log_prior_from

if TYPE_CHECKING:
    import numpy as np



def _log_prior64(class_counts, count_smoothing: float, name: str = "class_counts") -> torch.Tensor:
    """``log(n / sum n)`` in float64 on the CPU; errors name the caller's argument ``name``."""
    try:
        counts = as_class_counts(class_counts, smoothing=count_smoothing)
    except (TypeError, ValueError) as exc:
        raise type(exc)(str(exc).replace("class_counts", name)) from None
    return log_prior_from(counts, torch.float64)


def logit_adjust(logits: torch.Tensor, class_counts: torch.Tensor | Sequence[int] | np.ndarray | None = None,
                 tau: float = 1.0, *, log_prior: torch.Tensor | None = None,
                 count_smoothing: float = 0.0) -> torch.Tensor:
    """Post-hoc logit adjustment ``z_ij - tau * log pi_j``, shape (N, C), dtype of ``logits``.

    Give exactly one of ``class_counts`` and ``log_prior``.

    Args:
        logits: (N, C) floating tensor of raw logits (or log-probabilities), not probabilities.
        class_counts: (C,) training counts ``n``, any numeric 1-D (tensor, sequence or numpy array) of whole
            numbers; ``log pi = log(n / sum n)`` is computed in float64.
        tau: the weight of the prior offset (finite).
        log_prior: (C,) floating tensor on the logits' device, a precomputed finite ``log pi``.
        count_smoothing: with ``class_counts``: zero counts raise unless ``count_smoothing > 0``, which uses
            ``n + count_smoothing``.

    Returns:
        (N, C) tensor of the adjusted logits, dtype and device of ``logits``.
    """
    check_logits("logits", logits)
    tau = check_finite_float("tau", tau)
    if (class_counts is None) == (log_prior is None):
        raise ValueError("give exactly one of class_counts and log_prior")
    if log_prior is not None:
        check_class_vector("log_prior", log_prior, logits.shape[1], logits.device)
        if not bool(torch.isfinite(log_prior).all()):
            raise ValueError("log_prior must be finite (a zero prior has log = -inf)")
        offset = tau * log_prior.to(torch.float64)
    else:
        log_pi = _log_prior64(class_counts, count_smoothing)
        check_num_classes(logits, log_pi.numel())
        offset = (tau * log_pi).to(logits.device)
    # half logits in float32, rounded once at the end (the offset rounded to fp16/bf16 first put ~1/3 of the
    # entries one ulp off the rounded z - tau log pi)
    work = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    return (logits.to(work) - offset.to(work)).to(logits.dtype)


def pc_softmax(logits: torch.Tensor, source_counts: torch.Tensor | Sequence[int] | np.ndarray,
               target_prior: torch.Tensor | Sequence[float] | np.ndarray | None = None, *,
               count_smoothing: float = 0.0) -> torch.Tensor:
    """PC Softmax probabilities ``softmax_j(z_ij - log p_s(j) + log p_t(j))``, shape (N, C).

    Args:
        logits: (N, C) floating tensor of raw logits (or log-probabilities), not probabilities.
        source_counts: (C,) training counts ``n`` (tensor, sequence or numpy array); ``p_s = n / sum n``,
            computed in float64.
        target_prior: (C,) non-negative, summing to 1 within 1e-3 (tensor, sequence or numpy; a float32
            softmax over 10^6 classes sums to 1 within ~1e-4, and the result does not depend on the prior's
            scale: the check only catches counts or unnormalised weights passed by mistake). None = uniform
            ``1/C``, which gives ``softmax(logit_adjust(z, n, tau=1))``.
        count_smoothing: zero counts in ``source_counts`` raise unless ``count_smoothing > 0``, which uses
            ``n + count_smoothing``.

    Returns:
        (N, C) tensor of probabilities (rows sum to 1), computed in at least float32, returned in the
        logits' dtype, on their device.
    """
    check_logits("logits", logits)
    num_classes = logits.shape[1]
    offset = -_log_prior64(source_counts, count_smoothing, "source_counts")
    check_num_classes(logits, offset.numel(), "source_counts")
    if target_prior is not None:
        try:
            p_t = (target_prior.detach().to("cpu") if isinstance(target_prior, torch.Tensor)
                   else as_cpu_tensor(target_prior))
        except (TypeError, ValueError, RuntimeError) as exc:
            kind = type(target_prior).__name__
            raise TypeError(f"target_prior must be a sequence of floats, got {kind}") from exc
        if p_t.dtype == torch.bool or p_t.is_complex():  # (a bool mask read as a one-hot prior)
            raise TypeError(f"target_prior must hold real probabilities, got {p_t.dtype}")
        p_t = p_t.to(torch.float64)
        if p_t.dim() != 1 or p_t.numel() != num_classes:
            raise ValueError(f"target_prior must have shape (C,) = ({num_classes},), got {tuple(p_t.shape)}")
        if not bool(torch.isfinite(p_t).all()) or bool((p_t < 0).any()):
            raise ValueError("target_prior must be finite and non-negative")
        if abs(float(p_t.sum()) - 1.0) > PRIOR_SUM_TOLERANCE:
            raise ValueError(f"target_prior must sum to 1 (within {PRIOR_SUM_TOLERANCE:g}), got "
                             f"{float(p_t.sum())!r}")
        offset = offset + p_t.log()
    compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    z = logits.to(compute) + offset.to(device=logits.device, dtype=compute)
    return torch.softmax(z, dim=1).to(logits.dtype)


def tau_normalize(weight: torch.Tensor, tau: float = 1.0, eps: float = 1e-12) -> torch.Tensor:
    """Tau-normalised classifier weight ``w_j / max(|w_j|_2, eps)^tau`` row-wise, shape (C, D).

    Args:
        weight: (C, D) float16, bfloat16, float32 or float64 tensor (one row per class).
        tau: the norm exponent, ``>= 0``: ``tau = 1`` gives unit-norm rows, ``tau = 0`` returns an unchanged
            copy.
        eps: ``> 0``, the lower bound on each row norm.

    Returns:
        (C, D) tensor, dtype and device of ``weight``; norms are computed in at least float32.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (C, D), got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float16, bfloat16, float32 or float64, got {weight.dtype}")
    tau = check_finite_float("tau", tau, min_value=0.0)
    eps = check_finite_float("eps", eps, min_value=0.0, min_inclusive=False)
    if tau == 0.0:
        return weight.clone()
    compute = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    w = weight.to(compute)
    norms = torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min(eps)
    return (w / norms.pow(tau)).to(weight.dtype)


def predict(logits: torch.Tensor, class_counts: torch.Tensor | Sequence[int] | np.ndarray, tau: float = 1.0, *,
            count_smoothing: float = 0.0) -> torch.Tensor:
    """Post-hoc adjusted predictions ``argmax_j (z_ij - tau * log pi_j)``, an (N,) int64 tensor, adjusted in at least
    float32 (half-precision logits are widened first).

    Args:
        logits: (N, C) floating tensor of raw logits (or log-probabilities), not probabilities.
        class_counts: (C,) training counts ``n`` (tensor, sequence or numpy array); ``pi = n / sum n``.
        tau: the weight of the prior offset (finite).
        count_smoothing: zero counts raise unless ``count_smoothing > 0``, which uses ``n + count_smoothing``.

    Returns:
        (N,) int64 tensor of predicted classes in ``[0, C)``, on the logits' device. A row holding NaN predicts
        its (first) NaN's class, as ``torch.argmax`` takes NaN for the largest (not checked here: a host sync on the
        GPU; :func:`fastlt.metrics.shot_accuracy` refuses NaN scores).
    """
    check_logits("logits", logits)
    # in at least float32: adjusted in bfloat16 (8 significant bits), ~4% of a long-tailed 1000-class batch's
    # predictions moved off the exact argmax (classes within an ulp of the top one rounded together)
    compute = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    return logit_adjust(logits.to(compute), class_counts, tau, count_smoothing=count_smoothing).argmax(dim=1)
