"""Label smoothing's sum ``sum_j w_j a_j`` kept relative to the running max, and the focal base ``1 - exp(-ce)`` for
small ``ce`` (:func:`fastlt.kernels.numerics.one_minus_exp_neg`), against the float64 reference: a large common
offset of the logits loses no precision, a row masked whole with ``finfo.min`` gets a finite loss, on every path:
one tile, several tiles, rows split over programs (each split's sum relative to its own max, moved to the row's
by the combine with the split's weights), and class chunks as the heads and class shards use them."""

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE
from test_kernels_soft_targets import _soft

from fastlt import reference as R
from fastlt._operator import AdjustedCEArgs
from fastlt.kernels import launch
from fastlt.kernels.numerics import one_minus_exp_neg

F64 = torch.float64
N, C = 4, 1000
PATHS = {"one tile": dict(block_n=1024), "several tiles": dict(block_n=256, num_splits=1),
         "split rows": dict(block_n=256, num_splits=4)}


def _rows(z, y, kw, path):
    args = AdjustedCEArgs.from_kwargs(DEVICE, reduction="none", **{k: (v.to(DEVICE) if torch.is_tensor(v) else v)
                                                                    for k, v in kw.items()})
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), **PATHS[path])
    return launch.loss(z.to(DEVICE), y.to(DEVICE), args, config=cfg)[0].cpu().double()


def _want(z, y, kw):
    return R.adjusted_cross_entropy(z.double(), y, reduction="none",
                                    **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()})


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_a_large_common_offset_keeps_its_precision(path, weighted):
    """Logits 3e4 + N(0, 1), fp32: the smoothing term no longer cancels two sums of ~3e7 (the raw sums erred by
    ~3e-4 here; now ~4e-7, the row's own rounding)."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(N, C, generator=gen) + 3e4
    y = torch.randint(0, C, (N,), generator=gen)
    kw = dict(label_smoothing=0.1)  # no additive term: its fp32 rounding at 3e4 (~1e-3) would dominate either way
    if weighted:
        kw["weight"] = torch.rand(C, generator=gen) + 0.5
    torch.testing.assert_close(_rows(z, y, kw, path), _want(z, y, kw), rtol=0, atol=5e-6)


@pytest.mark.parametrize("path", list(PATHS))
def test_a_row_masked_whole_with_finfo_min_is_finite(path):
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(N, C, generator=gen)
    z[1] = torch.finfo(torch.float32).min
    y = torch.randint(0, C, (N,), generator=gen)
    kw = dict(label_smoothing=0.1)
    got = _rows(z, y, kw, path)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _want(z, y, kw), rtol=1e-6, atol=1e-5)  # row 1: log C


@pytest.mark.parametrize("masked", [False, True], ids=["offset", "finfo_min_row"])
def test_class_chunks_combine_relative_sums(masked):
    """:func:`fastlt.kernels.launch.chunk_partials` over class chunks (a head's class chunks, a class shard), then
    :func:`fastlt.kernels.launch.combine_partials`: the same precision."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(N, C, generator=gen) + (0.0 if masked else 3e4)
    if masked:
        z[2] = torch.finfo(torch.float32).min
    y = torch.randint(0, C, (N,), generator=gen)
    kw = dict(label_smoothing=0.1, weight=torch.rand(C, generator=gen) + 0.5)
    args = AdjustedCEArgs.from_kwargs(DEVICE, reduction="none", label_smoothing=0.1, weight=kw["weight"].to(DEVICE))
    bounds = [0, 296, 600, 1000]
    part = torch.empty((launch.PARTIAL_PLANES, N, 3), device=DEVICE)
    zd, yd = z.to(DEVICE), y.to(DEVICE)
    for k, (c0, c1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        launch.chunk_partials(zd[:, c0:c1].contiguous(), yd, args, part, k, col_base=c0, num_classes=C)
    got = launch.combine_partials(part, yd, args, C)[0].cpu().double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _want(z, y, kw), rtol=1e-6, atol=5e-6)


def _soft_targets(gen):
    """(N, C) class probabilities: a dense softmax for half the rows, mixup pairs for the others."""
    q = _soft(N, C, gen, "dense")
    q[::2] = _soft(N, C, gen, "mixup")[::2]
    return q


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.1, weighted=True),
                                dict(gamma=2.0)], ids=["plain", "smooth", "smooth_weighted", "focal"])
def test_class_probabilities_with_a_large_common_offset_keep_their_precision(path, kw):
    """Class-probability targets' ``A_q = sum_j w_j q'_ij a_ij`` (label smoothing folded into ``q'``) is kept
    relative to the running max too: logits 3e4 + N(0, 1), fp32, give the row's own rounding (~4e-7; the raw sums
    erred by ~4e-3 there, 8000 times torch's float32 error). Loss rows and the gradient (the gradient in the forward,
    and recomputed) against float64."""
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(N, C, generator=gen) + 3e4
    q = _soft_targets(gen)
    kw = dict(kw)
    if kw.pop("weighted", False):
        kw["weight"] = torch.rand(C, generator=gen) + 0.5
    torch.testing.assert_close(_rows(z, q, kw, path), _want(z, q, kw), rtol=0, atol=5e-6)
    args = AdjustedCEArgs.from_kwargs(DEVICE, reduction="sum", **{k: (v.to(DEVICE) if torch.is_tensor(v) else v)
                                                                   for k, v in kw.items()})
    cfg = launch.pick_tiles(N, C, torch.device(DEVICE), **PATHS[path])
    z64 = z.double().requires_grad_()
    R.adjusted_cross_entropy(z64, q.double(), reduction="sum",
                             **{k: (v.double() if torch.is_tensor(v) else v) for k, v in kw.items()}).backward()
    zd, qd = z.to(DEVICE), q.to(DEVICE)
    _, stats, coef = launch.loss(zd, qd, args, config=cfg)
    recomputed = launch.grad(zd, qd, args, stats, coef, None, config=cfg)
    torch.testing.assert_close(recomputed.cpu().double(), z64.grad, rtol=0, atol=2e-6)
    g = zd.clone()
    launch.loss(g, qd, args, grad_out=g, config=cfg)
    torch.testing.assert_close(g.cpu().double(), z64.grad, rtol=0, atol=2e-6)


@pytest.mark.parametrize("smooth", [False, True])
def test_class_probabilities_over_class_chunks_keep_their_precision(smooth):
    """:func:`fastlt.kernels.launch.chunk_partials` of class-probability targets over class chunks (a head's), then
    :func:`fastlt.kernels.launch.combine_partials`: each chunk's ``A_q`` moved to the row's max with its ``W_q``."""
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(N, C, generator=gen) + 3e4
    q = _soft_targets(gen)
    kw = dict(label_smoothing=0.1) if smooth else {}
    args = AdjustedCEArgs.from_kwargs(DEVICE, reduction="none", **kw)
    bounds = [0, 296, 600, 1000]
    part = torch.empty((6, N, 3), device=DEVICE)
    zd, qd = z.to(DEVICE), q.to(DEVICE)
    for k, (c0, c1) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        launch.chunk_partials(zd[:, c0:c1].contiguous(), qd[:, c0:c1].contiguous(), args, part, k, col_base=c0,
                              num_classes=C)
    got = launch.combine_partials(part, qd, args, C)[0].cpu().double()
    torch.testing.assert_close(got, _want(z, q, kw), rtol=0, atol=5e-6)


@triton.jit
def _one_minus_exp_neg_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + i, one_minus_exp_neg(x), mask=i < n)


def test_focal_base_is_accurate_for_small_cross_entropy():
    """``1 - exp(-x)`` within 1e-6 relative of float64 from 1e-9 to 30 (fp32 ``1 - exp(-x)`` loses every bit at
    1e-9); the focal factor of a confident row follows. The series runs to 1/2, so the GPU's approximate exp is
    magnified at most 1.5 times above it (from 1/32, 32 times: ~4e-6 on sm_90's ex2.approx, past this bound); the
    points around the switch are dense here."""
    x = torch.cat([torch.logspace(-9, 1.5, 200), torch.linspace(0.03, 0.6, 200),
                   torch.tensor([0.0, 0.5, 0.4999])]).float()
    out = torch.empty_like(x)
    xd, outd = x.to(DEVICE), out.to(DEVICE)
    _one_minus_exp_neg_kernel[(1,)](xd, outd, x.numel(), BLOCK=512)
    want = -torch.expm1(-x.double())
    got = outd.cpu().double()
    assert got[-3] == 0.0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # the GPU's exp is approximate: with 4 ulps of error in exp above the switch the bound still holds
    above = x.double() >= 0.5
    worst = (torch.exp(-x.double()[above]) * 4 * 2.0**-23 / want[above]).max()
    assert worst < 1e-6
