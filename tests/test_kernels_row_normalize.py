"""The cosine heads' row normalisation kernels against F.normalize (float64 autograd)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from oracle import assert_oracle_close

from fastlt.kernels.row_normalize import normalize_rows, normalize_rows_backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("R,D", [(1, 1), (5, 7), (33, 100), (3, 4100)])
def test_normalize_rows_forward_and_backward(dtype, R, D):
    gen = torch.Generator().manual_seed(R * 1000 + D)
    x64 = torch.randn(R, D, generator=gen, dtype=torch.float64)
    x64[0] *= 1e-14  # a row under eps: clamped, no gradient through the norm
    g64 = torch.randn(R, D, generator=gen, dtype=torch.float64)
    eps = 1e-12
    x = x64.to(dtype)
    y, inv = normalize_rows(x.to(DEVICE), eps)
    dx = normalize_rows_backward(x.to(DEVICE), inv, g64.to(dtype).to(DEVICE), eps)
    assert y.dtype == dtype and dx.dtype == dtype and inv.dtype == torch.float32

    leaf = x.to(torch.float64).requires_grad_()
    ref = F.normalize(leaf, dim=1, eps=eps)
    ref.backward(g64.to(dtype).to(torch.float64))
    same = x.float().requires_grad_()
    ref_same = F.normalize(same, dim=1, eps=eps)
    ref_same.backward(g64.to(dtype).float())
    assert_oracle_close(y, ref, ref_same.to(dtype), dtype, what="y")
    assert_oracle_close(inv, 1.0 / leaf.detach().norm(dim=1).clamp_min(eps), 1.0 / same.detach().norm(dim=1)
                        .clamp_min(eps), torch.float32, what="inv")
    # the tiny row's gradient is g / eps (1e12: beyond fp16's range, inf there as in torch): compare it
    # relatively, the other rows with the oracle rule
    if dtype != torch.float16:
        torch.testing.assert_close(dx[0].double().cpu(), leaf.grad[0], rtol=1e-2, atol=0)
    assert_oracle_close(dx[1:], leaf.grad[1:], same.grad[1:].to(dtype), dtype, factor=3.0, what="dx")


def test_normalize_rows_non_contiguous_input():
    x = torch.randn(6, 10, device=DEVICE)[:, ::2]
    y, inv = normalize_rows(x, 1e-12)
    torch.testing.assert_close(y, F.normalize(x, dim=1))
