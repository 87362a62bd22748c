"""``CosineClassifier``: cosine logits ``cos_ij = <f_i/|f_i|, w_j/|w_j|>`` in [-1, 1], the input of GCL."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._validation import FLOAT_DTYPES, check_dtype_matches_weight, check_finite_float, check_int
from .reference import normalize_rows


class CosineClassifier(nn.Module):
    """Features (N, D) -> cosine logits (N, C); ``weight`` is (C, D) like ``nn.Linear`` (no bias).

    GCL's ``NormedLinear`` (official code) computes the same product; feed its output to
    :class:`fastlt.GCLLoss`, which applies the scale ``s``.

    Args:
        in_features: D, the feature width, at least 1 (a Python or numpy int).
        num_classes: C, at least 1.
        eps: ``> 0``, the lower bound on the feature and weight-row norms.
    """

    def __init__(self, in_features: int, num_classes: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)  # numpy ints too (labels.max() + 1)
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.eps = check_finite_float("eps", eps)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (it bounds the norms away from 0), got {self.eps}")
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine logits of a batch of features.

        Args:
            features: (N, D) floating tensor (float16, bfloat16, float32 or float64), of the weight's dtype
                and device.

        Returns:
            (N, C) tensor of cosines in [-1, 1], in the dtype of the product (that of ``features`` and
            ``weight``, or the autocast dtype).
        """
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features must be a floating tensor, got {features.dtype}")
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}")
        weight = self.weight
        if features.device != weight.device:
            raise ValueError(f"features are on {features.device} but weight is on {weight.device}")
        check_dtype_matches_weight(features, weight)
        return normalize_rows(features, self.eps) @ normalize_rows(weight, self.eps).t()

    def extra_repr(self) -> str:
        """The module's repr details.

        Returns:
            ``'in_features=D, num_classes=C'``.
        """
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
