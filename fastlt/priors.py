"""Per-class quantities derived from training counts (all (C,) tensors, computed in float64).

- ``log_prior``: ``log(n_j / sum n)``, the source label prior of logit adjustment and LADE.
- ``ldam_margins``: LDAM's ``m_j ∝ n_j^(-1/4)``, rescaled so the largest margin is ``max_margin``.
- ``gcl_cloud``: GCL's normalised cloud size ``delta_j / max(delta)``, ``delta_j = log n_max - log n_j``
  (all zeros when every count is equal; the official code returns NaN there).
"""

from __future__ import annotations

import torch

from ._validation import FLOAT_DTYPES, as_class_counts, check_finite_float


def _check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float16, bfloat16, float32 or float64, got {dtype!r}")
    return dtype


def prior(class_counts, *, count_smoothing: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """``pi_j = n_j / sum n`` as a (C,) tensor of ``dtype``."""
    return prior_from(as_class_counts(class_counts, smoothing=count_smoothing), _check_dtype(dtype))


def log_prior(class_counts, *, count_smoothing: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """``log pi_j = log(n_j / sum n)`` as a (C,) tensor; zero counts raise unless smoothed."""
    return log_prior_from(as_class_counts(class_counts, smoothing=count_smoothing), _check_dtype(dtype))


def ldam_margins(class_counts, max_margin: float = 0.5, *, count_smoothing: float = 0.0,
                 dtype=torch.float32) -> torch.Tensor:
    """LDAM margins ``m_j = max_margin * n_j^(-1/4) / max_k n_k^(-1/4)`` (Cao et al., 2019)."""
    max_margin = check_finite_float("max_margin", max_margin, min_value=0.0)
    return ldam_margins_from(as_class_counts(class_counts, smoothing=count_smoothing), max_margin, _check_dtype(dtype))


def gcl_cloud(class_counts, *, count_smoothing: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """GCL cloud sizes ``delta_j / max(delta)`` in [0, 1]; 0 for the most frequent class."""
    return gcl_cloud_from(as_class_counts(class_counts, smoothing=count_smoothing), _check_dtype(dtype))


# the same from counts already validated (and smoothed) by ``as_class_counts``: float64, positive


def prior_from(counts: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (counts / counts.sum()).to(dtype)


def log_prior_from(counts: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (counts.log() - counts.sum().log()).to(dtype)


def ldam_margins_from(counts: torch.Tensor, max_margin: float, dtype=torch.float32) -> torch.Tensor:
    m = counts.pow(-0.25)
    return (m * (max_margin / m.max())).to(dtype)


def gcl_cloud_from(counts: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    delta = counts.log().max() - counts.log()
    top = delta.max()
    if top <= 0:
        return torch.zeros_like(delta, dtype=dtype)
    return (delta / top).to(dtype)
