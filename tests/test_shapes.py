"""The shapes ``F.cross_entropy`` takes beside (N, C): unbatched (C,) logits and (N, C, d1, ..., dk) logits with
(N, d1, ..., dk) targets, on both backends (the kernels: the interpreter without a GPU), against
``F.cross_entropy`` at the identity setting (tau = 0) and against the (N*d, C) rows otherwise."""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import fastlt
from fastlt import functional as LF
from fastlt import reference as R
from fastlt.priors import prior

C = 5
COUNTS = torch.tensor([40, 20, 9, 4, 1])


def _weight(dtype):
    return (torch.arange(1, C + 1, dtype=torch.float32) / 4).to(dtype)  # exact in every float dtype


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("spatial", [(3, 4), (7,)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_k_dim_matches_f_cross_entropy(backend, dtype, spatial, reduction, label_smoothing):
    """(N, C, d1, ...) logits and (N, d1, ...) targets with ignored positions and class weights: the loss and the
    gradient of F.cross_entropy, the 'none' result in the targets' shape."""
    gen = torch.Generator().manual_seed(len(spatial))
    z = torch.randn(2, C, *spatial, generator=gen, dtype=dtype)
    y = torch.randint(0, C, (2, *spatial), generator=gen)
    y.view(-1)[[1, 5]] = -100
    crit = fastlt.LogitAdjustedLoss(COUNTS, tau=0.0, weight=_weight(dtype), reduction=reduction,
                                    label_smoothing=label_smoothing, backend=backend)
    zk = z.to(DEVICE).detach().requires_grad_()
    got = crit(zk, y.to(zk.device))
    z64 = z.double().requires_grad_()
    want = F.cross_entropy(z64, y, weight=_weight(torch.float64), reduction=reduction,
                           label_smoothing=label_smoothing)
    assert got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.cpu().double(), want.detach(), rtol=tol, atol=tol)
    (got * torch.linspace(0.5, 1.5, got.numel()).reshape(got.shape).to(got)).sum().backward()
    (want * torch.linspace(0.5, 1.5, want.numel()).reshape(want.shape).double()).sum().backward()
    torch.testing.assert_close(zk.grad.cpu().double(), z64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_unbatched_matches_f_cross_entropy(backend, dtype, reduction):
    z = torch.randn(C, generator=torch.Generator().manual_seed(3), dtype=dtype).to(DEVICE if backend == "triton"
                                                                                    else "cpu")
    y = torch.tensor(2, device=z.device)
    got = LF.logit_adjusted_cross_entropy(z, y, torch.zeros(C, dtype=dtype, device=z.device), 0.0,
                                          reduction=reduction, backend=backend)
    want = F.cross_entropy(z.cpu().double(), y.cpu(), reduction=reduction)
    assert got.shape == want.shape == ()
    torch.testing.assert_close(got.cpu().double(), want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_every_loss_takes_positions_as_rows(backend, dtype):
    """LDAM, GCL (noise rows = positions in (n, d1, ...) order) and LADE on (N, C, d) equal their (N*d, C) rows."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(2, C, 3, generator=gen, dtype=dtype).to(DEVICE if backend == "triton" else "cpu")
    y = torch.randint(0, C, (2, 3), generator=gen).to(z.device)
    rows, y_rows = z.movedim(1, -1).reshape(-1, C), y.reshape(-1)
    for crit, kw in ((fastlt.LDAMLoss(COUNTS, backend=backend), {}), (fastlt.GCLLoss(COUNTS, backend=backend),
                                                                      dict(seed=11)),
                     (fastlt.LADELoss(COUNTS, backend=backend), {})):
        crit = crit.to(z.device)
        torch.testing.assert_close(crit(z, y, **kw), crit(rows, y_rows, **kw), rtol=1e-6, atol=1e-6)
    none = fastlt.GCLLoss(COUNTS, reduction="none", backend=backend).to(z.device)
    assert torch.equal(none(z, y, seed=4), none(rows, y_rows, seed=4).reshape(2, 3))
    pi = prior(COUNTS).to(dtype)
    torch.testing.assert_close(R.lade_loss(z.cpu(), y.cpu(), pi), R.lade_loss(rows.cpu(), y_rows.cpu(), pi))


def test_shape_errors_name_the_argument():
    crit = fastlt.LogitAdjustedLoss(COUNTS, backend="torch")
    with pytest.raises(ValueError, match=r"\(N, d1, \.\.\.\)"):
        crit(torch.randn(2, C, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="0-dim target"):
        crit(torch.randn(C), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="0-dim"):
        crit(torch.tensor(1.0), torch.tensor(0))
    with pytest.raises(ValueError, match="class_counts"):
        crit(torch.randn(2, C + 1, 3), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="float"):
        crit(torch.zeros(2, C, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


def test_shape_errors_name_the_callers_shapes():
    """N-D and unbatched mismatches were reported in the flattened rows' shapes ((24, 5) for (2, 5, 3, 4) logits)."""
    crit = fastlt.LogitAdjustedLoss([40, 20, 8, 3, 1], backend="torch")
    with pytest.raises(TypeError, match=r"integer class indices of shape \(2, 3, 4\) or class probabilities of the "
                                        r"logits' shape \(2, 5, 3, 4\), got torch.float32 of shape \(2, 3, 4\)"):
        crit(torch.randn(2, 5, 3, 4), torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match=r"logits' shape \(5,\), got \(6,\)"):
        crit(torch.randn(5), torch.rand(6))
    with pytest.raises(TypeError, match=r"integer class indices of shape \(\)"):
        crit(torch.randn(5), torch.tensor(1.0))
