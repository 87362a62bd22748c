"""``CosineClassifier``: cosine logits ``cos_ij = <f_i/|f_i|, w_j/|w_j|>`` in [-1, 1], the input of GCL."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Features (N, D) -> cosine logits (N, C); ``weight`` is (C, D) like ``nn.Linear`` (no bias).

    GCL's ``NormedLinear`` (official code) computes the same product; feed its output to
    :class:`fastlt.GCLLoss`, which applies the scale ``s``.
    """

    def __init__(self, in_features: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        if in_features < 1 or num_classes < 1:
            raise ValueError(f"in_features and num_classes must be >= 1, got {in_features}, {num_classes}")
        self.in_features, self.num_classes, self.eps = in_features, num_classes, eps
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.uniform_(self.weight, -1.0 / math.sqrt(in_features), 1.0 / math.sqrt(in_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"features must have shape (N, {self.in_features}), got {tuple(features.shape)}")
        return F.normalize(features, dim=1, eps=self.eps) @ F.normalize(self.weight, dim=1, eps=self.eps).t()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"
