"""fastlt: fused GPU losses for long-tailed classification.

Modules: :class:`LogitAdjustedLoss`, :class:`BalancedSoftmaxLoss`, :class:`LDAMLoss`, :class:`GCLLoss`,
:class:`LADELoss`, :class:`CosineClassifier`; fused heads (features in, no (N, C) logits)
:class:`LinearLossHead`, :class:`CosineGCLHead`. Submodules: ``functional`` (the same as functions,
``backend=`` switch), ``reference`` (the pure-PyTorch oracle), ``priors``, ``noise``, ``posthoc``,
``data``, ``metrics``, ``heads`` (the fused heads' functions and modules; ``lade_head`` re-exports its LADE
head for code written against it) and ``distributed`` (data parallel: ``dp_group=``). The design: docs/design.md.
"""

from . import data, distributed, functional, heads, lade_head, metrics, noise, posthoc, priors, reference
from .cosine import CosineClassifier
from .heads import CosineGCLHead, LinearLossHead
from .losses import BalancedSoftmaxLoss, GCLLoss, LADELoss, LDAMLoss, LogitAdjustedLoss

__version__ = "0.1.0"

__all__ = [
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "LDAMLoss",
    "GCLLoss",
    "LADELoss",
    "CosineClassifier",
    "LinearLossHead",
    "CosineGCLHead",
    "heads",
    "lade_head",
    "functional",
    "reference",
    "priors",
    "noise",
    "posthoc",
    "data",
    "metrics",
    "distributed",
]
