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


@pytest.mark.parametrize("scale,eps", [(1e25, 1e-12), (1e36, 1e-12), (1e-25, 1e-35), (1e-36, 2e-38)],
                         ids=["1e25", "1e36", "1e-25", "1e-36"])
def test_normalize_rows_extreme_norms_against_float64(scale, eps):
    """fp32 rows whose sum of squares overflows (|x| > 1.8e19) or underflows fp32 keep their norm: the kernel and
    the reference both match float64, value and gradient (the plain fp32 formula gives 0 or x / eps there)."""
    gen = torch.Generator().manual_seed(7)
    R, D = 6, 37
    x64 = torch.randn(R, D, generator=gen, dtype=torch.float64)
    x64[1:3] *= scale  # two extreme rows beside ordinary ones in one program
    x64[4] = 0.0  # a zero row stays 0 on the extreme path
    x64[5, 3:] = 0.0
    x64[5, :3] *= scale
    g64 = torch.randn(R, D, generator=gen, dtype=torch.float64)
    x = x64.float()
    leaf = x.double().requires_grad_()
    expected = F.normalize(leaf, dim=1, eps=eps)  # float64: no overflow at these sizes
    expected.backward(g64.float().double())

    y, inv = normalize_rows(x.to(DEVICE), eps)
    dx = normalize_rows_backward(x.to(DEVICE), inv, g64.float().to(DEVICE), eps)
    torch.testing.assert_close(y.double().cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    norm64 = leaf.detach().norm(dim=1).clamp_min(eps)
    torch.testing.assert_close(inv.double().cpu() * norm64, torch.ones(R, dtype=torch.float64), rtol=1e-5, atol=0)
    grad_scale = leaf.grad.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close((dx.double().cpu() / grad_scale), leaf.grad / grad_scale, rtol=1e-5, atol=1e-5)

    from fastlt.reference import normalize_rows as reference_normalize_rows
    same = x.clone().requires_grad_()
    ref = reference_normalize_rows(same, eps)
    ref.backward(g64.float())
    torch.testing.assert_close(ref.detach().double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(same.grad.double() / grad_scale, leaf.grad / grad_scale, rtol=1e-5, atol=1e-5)


def test_normalize_rows_eps_below_float32_reciprocal_keeps_zero_rows_zero():
    """eps = 1e-44: 1 / eps overflows fp32; a zero row is still 0 (not 0 * inf = NaN), as F.normalize gives."""
    x = torch.zeros(3, 5)
    x[1] = torch.arange(1.0, 6.0)
    y, _ = normalize_rows(x.to(DEVICE), 1e-44)
    torch.testing.assert_close(y.cpu(), F.normalize(x, dim=1, eps=1e-44))
    from fastlt.reference import normalize_rows as reference_normalize_rows
    torch.testing.assert_close(reference_normalize_rows(x, 1e-44), F.normalize(x, dim=1, eps=1e-44))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_normalize_rows_one_column_gradient_is_exactly_zero(dtype):
    """D = 1: y = sign(x), so d y / d x = 0 above eps (1 / eps at or below it). The general formula left a few ulps
    of g, times 1 / |x|, which depended on how the upstream gradient was rounded (a cosine head's dF of 4e-5 on
    one CPU, 0 on another)."""
    gen = torch.Generator().manual_seed(11)
    x = (torch.rand(64, 1, generator=gen) * 0.1 + 1e-3) * torch.where(torch.rand(64, 1, generator=gen) < 0.5, -1, 1)
    x[0] = 0.0  # at the clamp: the gradient is g / eps
    g = torch.randn(64, 1, generator=gen) * 10
    x, g = x.to(dtype), g.to(dtype)
    _, inv = normalize_rows(x.to(DEVICE), 1e-6)
    dx = normalize_rows_backward(x.to(DEVICE), inv, g.to(DEVICE), 1e-6).cpu()
    assert torch.equal(dx[1:], torch.zeros_like(dx[1:]))
    torch.testing.assert_close(dx[0].double(), g[0].double() / 1e-6, rtol=1e-2, atol=0)
