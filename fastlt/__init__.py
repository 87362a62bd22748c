"""fastlt: fused GPU losses for long-tailed classification.

Modules: :class:`LogitAdjustedLoss`, :class:`BalancedSoftmaxLoss`, :class:`LDAMLoss`, :class:`GCLLoss`,
:class:`LADELoss`, :class:`CosineClassifier`. Submodules: ``functional`` (the same as functions,
``backend=`` switch), ``reference`` (the pure-PyTorch oracle), ``priors``, ``noise``, ``posthoc``,
``data``, ``metrics``.
"""

from . import data, functional, metrics, noise, posthoc, priors, reference
from .cosine import CosineClassifier
from .losses import BalancedSoftmaxLoss, GCLLoss, LADELoss, LDAMLoss, LogitAdjustedLoss

__version__ = "0.1.0"

__all__ = [
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "LDAMLoss",
    "GCLLoss",
    "LADELoss",
    "CosineClassifier",
    "functional",
    "reference",
    "priors",
    "noise",
    "posthoc",
    "data",
    "metrics",
]
