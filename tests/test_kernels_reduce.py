"""``launch.reduce`` / ``launch.inv_denominator_of``: the batch reductions in one launch, against torch."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE

from fastlt._operator import AdjustedCEArgs
from fastlt.kernels import launch, tiles


@pytest.fixture(params=["one_launch", "torch"], autouse=True)
def path(request, monkeypatch):
    """Every test runs on both paths: the one-program kernel and torch's reductions (long batches)."""
    if request.param == "torch":
        monkeypatch.setattr(tiles, "ONE_PROGRAM_ROWS", 0)
    return request.param


def _case(N: int, C: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.rand(N, generator=gen) * 5
    y = torch.randint(0, C, (N,), generator=gen)
    y[::3] = -100
    rows[y == -100] = 0.0  # as the row kernels write them
    w = torch.rand(C, generator=gen) + 0.5
    return rows, y, w


def _want_denominator(y: torch.Tensor, w: torch.Tensor | None) -> float:
    valid = y != -100
    if w is None:
        return float(valid.sum())
    return float(w.double()[y[valid]].sum())


@pytest.mark.parametrize("N", [1, 5, 1024, 9000])  # 9000: several BLOCK-wide loop steps and a partial one
@pytest.mark.parametrize("weighted", [False, True])
def test_inv_denominator_and_reductions(N, weighted):
    C = 13
    rows, y, w = _case(N, C, N)
    args = AdjustedCEArgs(weight=w.to(DEVICE) if weighted else None, reduction="mean")
    yk = y.to(DEVICE)
    rk = rows.to(DEVICE)
    denom = _want_denominator(y, w if weighted else None)
    inv = launch.inv_denominator_of(yk, args)
    assert inv.shape == (1,) and inv.dtype == torch.float32
    assert math.isclose(inv.item(), 1 / denom if denom else math.inf, rel_tol=1e-6)

    mean = launch.reduce(rk, yk, args)
    want = rows.double().sum().item() / denom if denom else math.nan
    assert mean.shape == () and mean.dtype == torch.float32
    if denom:
        assert math.isclose(mean.item(), want, rel_tol=1e-5)
    else:
        assert math.isnan(mean.item())
    same = launch.reduce(rk, yk, args, inv_denominator=inv)
    torch.testing.assert_close(same, mean, equal_nan=True)
    total = launch.reduce(rk, yk, AdjustedCEArgs(weight=args.weight, reduction="sum"))
    assert math.isclose(total.item(), rows.double().sum().item(), rel_tol=1e-5)
    none = launch.reduce(rk, yk, AdjustedCEArgs(reduction="none"))
    assert none is rk  # 'none' hands back the per-row losses themselves


def test_mean_scales_the_factor_in_the_same_launch_and_writes_the_output_dtype():
    rows, y, w = _case(37, 9, 0)
    factor = torch.rand(37, generator=torch.Generator().manual_seed(1))
    args = AdjustedCEArgs(weight=w.to(DEVICE), reduction="mean")
    fk = factor.to(DEVICE).clone()
    loss = launch.reduce(rows.to(DEVICE), y.to(DEVICE), args, row_coef=fk, out_dtype=torch.bfloat16)
    denom = _want_denominator(y, w)
    assert loss.dtype == torch.bfloat16
    assert math.isclose(loss.float().item(), rows.double().sum().item() / denom, rel_tol=1e-2)
    # the valid rows' factors scaled; an ignored row's is 0 (the row kernels write 0 there; this launch keeps it 0
    # even when 1 / sum w is inf)
    torch.testing.assert_close(fk.cpu(), torch.where(y != -100, factor / denom, 0.0), rtol=1e-6, atol=0)


def test_targets_outside_the_classes_count_zero_in_the_weighted_denominator():
    """Out-of-range targets give NaN rows in the kernels; the denominator must not read out of bounds."""
    w = torch.tensor([1.0, 2.0, 3.0])
    y = torch.tensor([0, 2, 7, -5, -100])
    inv = launch.inv_denominator_of(y.to(DEVICE), AdjustedCEArgs(weight=w.to(DEVICE), reduction="mean"))
    assert math.isclose(inv.item(), 1 / 4.0, rel_tol=1e-6)


def test_empty_batch():
    y = torch.empty(0, dtype=torch.int64, device=DEVICE)
    rows = torch.empty(0, device=DEVICE)
    assert math.isnan(launch.reduce(rows, y, AdjustedCEArgs(reduction="mean")).item())
    assert launch.reduce(rows, y, AdjustedCEArgs(reduction="sum")).item() == 0.0


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_loss_and_gradient_through_either_path(grad_in_forward):
    """A weighted 'mean' loss end to end (the factor's 1/sum w applied by the reduction) equals the reference."""
    from fastlt import functional as LF
    from fastlt import reference as R

    gen = torch.Generator().manual_seed(2)
    N, C = 11, 19
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    y[3] = -100
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    prior = torch.randn(C, generator=gen, dtype=torch.float64)
    leaf = z.float().to(DEVICE).requires_grad_()
    logits = leaf * 1.0
    loss = LF.adjusted_cross_entropy(logits, y.to(DEVICE), log_prior=prior.float().to(DEVICE),
                                     weight=w.float().to(DEVICE), backend="triton", grad_in_forward=grad_in_forward)
    loss.backward(torch.tensor(1.5, device=DEVICE))
    z64 = z.clone().requires_grad_()
    ref = R.adjusted_cross_entropy(z64, y, log_prior=prior, weight=w)
    ref.backward(torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(loss.detach().cpu().double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad.cpu().double(), z64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("E", [1, 5000])  # 5000: several BLOCK-wide steps over the extra values
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_extra_values_are_added_after_the_mean(E, reduction):
    """``extra=`` (LADE's LADER partials) adds its sum to the reduced loss, outside the 'mean' division."""
    rows, y, w = _case(21, 7, 3)
    extra = torch.randn(E, generator=torch.Generator().manual_seed(E)).float()
    args = AdjustedCEArgs(weight=w.to(DEVICE), reduction=reduction)
    got = launch.reduce(rows.to(DEVICE), y.to(DEVICE), args, extra=extra.to(DEVICE))
    base = rows.double().sum().item() / (_want_denominator(y, w) if reduction == "mean" else 1.0)
    assert math.isclose(got.item(), base + extra.double().sum().item(), rel_tol=1e-5, abs_tol=1e-4)
    with pytest.raises(ValueError, match="extra= needs a reduced loss"):
        launch.reduce(rows.to(DEVICE), y.to(DEVICE), AdjustedCEArgs(reduction="none"), extra=extra.to(DEVICE))


def test_mean_of_no_valid_row_keeps_the_factors_zero():
    """Every row ignored: 1 / sum w is inf, the loss NaN (as torch's), and the factors (hence the gradients) stay 0
    rather than 0 * inf = NaN."""
    y = torch.full((9,), -100)
    rows = torch.zeros(9)
    fk = torch.zeros(9, device=DEVICE)
    loss = launch.reduce(rows.to(DEVICE), y.to(DEVICE), AdjustedCEArgs(reduction="mean"), row_coef=fk)
    assert math.isnan(loss.item())
    assert torch.equal(fk.cpu(), torch.zeros(9))
