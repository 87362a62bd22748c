"""Per-class quantities derived from training counts (all (C,) tensors, computed in float64).

- ``log_prior``: ``log(n_j / sum n)``, the source label prior of logit adjustment and LADE.
- ``ldam_margins``: LDAM's ``m_j ∝ n_j^(-1/4)``, rescaled so the largest margin is ``max_margin``.
- ``gcl_cloud``: GCL's normalised cloud size ``delta_j / max(delta)``, ``delta_j = log n_max - log n_j``
  (all zeros when every count is equal; the official code returns NaN there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ._validation import FLOAT_DTYPES, as_class_counts, check_finite_float

if TYPE_CHECKING:
    import numpy as np


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float16, bfloat16, float32 or float64, got {dtype!r}")
    return dtype


def prior(class_counts: torch.Tensor | Sequence[int] | np.ndarray, *, count_smoothing: float = 0.0,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``pi_j = n_j / sum n`` as a (C,) tensor of ``dtype``.

    Args:
        class_counts: (C,) training counts ``n`` (tensor, sequence or numpy array of non-negative whole
            numbers).
        count_smoothing: zero counts raise unless ``count_smoothing > 0``, which uses ``n + count_smoothing``.
        dtype: the result's dtype: torch.float16, bfloat16, float32 or float64 (computed in float64).

    Returns:
        (C,) CPU tensor of ``dtype``.
    """
    return prior_from(as_class_counts(class_counts, smoothing=count_smoothing), _check_dtype(dtype))


def log_prior(class_counts: torch.Tensor | Sequence[int] | np.ndarray, *, count_smoothing: float = 0.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``log pi_j = log(n_j / sum n)`` as a (C,) tensor; zero counts raise unless smoothed.

    Args:
        class_counts: (C,) training counts ``n`` (tensor, sequence or numpy array of non-negative whole
            numbers).
        count_smoothing: zero counts raise unless ``count_smoothing > 0``, which uses ``n + count_smoothing``.
        dtype: the result's dtype: torch.float16, bfloat16, float32 or float64 (computed in float64).

    Returns:
        (C,) CPU tensor of ``dtype``.
    """
    return log_prior_from(as_class_counts(class_counts, smoothing=count_smoothing), _check_dtype(dtype))


def ldam_margins(class_counts: torch.Tensor | Sequence[int] | np.ndarray, max_margin: float = 0.5, *,
                 count_smoothing: float = 0.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LDAM margins ``m_j = max_margin * n_j^(-1/4) / max_k n_k^(-1/4)`` (Cao et al., 2019).

    Args:
        class_counts: (C,) training counts ``n`` (tensor, sequence or numpy array of non-negative whole
            numbers).
        max_margin: ``>= 0``, the largest margin (that of the rarest class).
        count_smoothing: zero counts raise unless ``count_smoothing > 0``, which uses ``n + count_smoothing``.
        dtype: the result's dtype: torch.float16, bfloat16, float32 or float64 (computed in float64).

    Returns:
        (C,) CPU tensor of ``dtype``; the rarest class gets ``max_margin``.
    """
    max_margin = check_finite_float("max_margin", max_margin, min_value=0.0)
    return ldam_margins_from(as_class_counts(class_counts, smoothing=count_smoothing), max_margin, _check_dtype(dtype))


def gcl_cloud(class_counts: torch.Tensor | Sequence[int] | np.ndarray, *, count_smoothing: float = 0.0,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GCL cloud sizes ``delta_j / max(delta)`` in [0, 1]; 0 for the most frequent class.

    Args:
        class_counts: (C,) training counts ``n`` (tensor, sequence or numpy array of non-negative whole
            numbers).
        count_smoothing: zero counts raise unless ``count_smoothing > 0``, which uses ``n + count_smoothing``.
        dtype: the result's dtype: torch.float16, bfloat16, float32 or float64 (computed in float64).

    Returns:
        (C,) CPU tensor of ``dtype`` in [0, 1]; 1 for the rarest class, all zeros when every count is equal.
    """
    return gcl_cloud_from(as_class_counts(class_counts, smoothing=count_smoothing), _check_dtype(dtype))


# the same from counts already validated (and smoothed) by ``as_class_counts``: float64, positive


def prior_from(counts: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``pi_j = n_j / sum n`` from counts already validated by ``as_class_counts``.

    Args:
        counts: (C,) float64 tensor of positive counts ``n``.
        dtype: the result's dtype.

    Returns:
        (C,) tensor of ``dtype`` on the device of ``counts``.
    """
    counts = counts / counts.max()  # (scaled first: counts near the largest float would overflow their sum)
    return (counts / counts.sum()).to(dtype)


def log_prior_from(counts: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``log pi_j = log(n_j / sum n)`` from counts already validated by ``as_class_counts``.

    Args:
        counts: (C,) float64 tensor of positive counts ``n``.
        dtype: the result's dtype.

    Returns:
        (C,) tensor of ``dtype`` on the device of ``counts``.
    """
    counts = counts / counts.max()  # (as prior_from)
    return (counts.log() - counts.sum().log()).to(dtype)


def ldam_margins_from(counts: torch.Tensor, max_margin: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LDAM margins ``m_j = max_margin * n_j^(-1/4) / max_k n_k^(-1/4)`` from validated counts.

    Args:
        counts: (C,) float64 tensor of positive counts ``n``.
        max_margin: the largest margin (that of the rarest class), a Python float.
        dtype: the result's dtype.

    Returns:
        (C,) tensor of ``dtype`` on the device of ``counts``.
    """
    m = counts.pow(-0.25)
    return (m * (max_margin / m.max())).to(dtype)


def gcl_cloud_from(counts: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """GCL cloud sizes ``delta_j / max(delta)``, ``delta_j = log n_max - log n_j``, from validated counts.

    Args:
        counts: (C,) float64 tensor of positive counts ``n``.
        dtype: the result's dtype.

    Returns:
        (C,) tensor of ``dtype`` in [0, 1] on the device of ``counts``; all zeros when every count is equal.
    """
    delta = counts.log().max() - counts.log()
    top = delta.max()
    if top <= 0:
        return torch.zeros_like(delta, dtype=dtype)
    return (delta / top).to(dtype)
