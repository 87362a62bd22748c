"""``CosineClassifier``: cosine logits ``cos_ij = <f_i/|f_i|, w_j/|w_j|>`` in [-1, 1], the input of GCL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._validation import FLOAT_DTYPES, check_finite_float, check_int


class CosineClassifier(nn.Module):
    """Features (N, D) -> cosine logits (N, C); ``weight`` is (C, D) like ``nn.Linear`` (no bias).

    GCL's ``NormedLinear`` (official code) computes the same product; feed its output to
    :class:`fastlt.GCLLoss`, which applies the scale ``s``.
    """

    def __init__(self, in_features: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1)  # numpy ints too (labels.max() + 1)
        self.num_classes = check_int("num_classes", num_classes, 1)
        self.eps = check_finite_float("eps", eps)
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0 (it bounds the norms away from 0), got {self.eps}")
        self.weight = nn.Parameter(torch.empty(self.num_classes, self.in_features))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dtype not in FLOAT_DTYPES:
            raise TypeError(f"features must be a floating tensor, got {features.dtype}")
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}")
        return F.normalize(features, dim=1, eps=self.eps) @ F.normalize(self.weight, dim=1, eps=self.eps).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
