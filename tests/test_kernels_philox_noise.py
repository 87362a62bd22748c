"""The kernels' Box-Muller step (``philox_noise._pair``): log2/sin/cos on exactly made arguments (the GPU's
special-function unit natively, numpy's exact functions in the interpreter), checked against float64 Box-Muller on
every 16-bit half of a Philox word."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from conftest import DEVICE

from fastlt.kernels.philox_noise import FAST_MATH, _pair, gcl_noise_at, gcl_noise_kernel


@triton.jit
def _pair_of_words(w_ptr, cos_ptr, sin_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(w_ptr + i, mask=i < n, other=0).to(tl.uint32, bitcast=True)
    e_cos, e_sin = _pair(w)
    tl.store(cos_ptr + i, e_cos, mask=i < n)
    tl.store(sin_ptr + i, e_sin, mask=i < n)


def _words() -> torch.Tensor:
    """Every low half with three high halves, and every high half with three low halves (as int64)."""
    h = torch.arange(65536, dtype=torch.int64)
    return torch.cat([h + (hi << 16) for hi in (0, 12345, 65535)] + [lo + (h << 16) for lo in (0, 777, 65535)])


def test_pair_matches_float64_box_muller_on_every_half():
    w = _words()
    n = w.numel()
    as_int32 = torch.where(w >= 2**31, w - 2**32, w).to(torch.int32).to(DEVICE)
    e_cos = torch.empty(n, device=DEVICE)
    e_sin = torch.empty(n, device=DEVICE)
    _pair_of_words[(triton.cdiv(n, 4096),)](as_int32, e_cos, e_sin, n, BLOCK=4096)
    u1 = ((w & 0xFFFF).double() + 0.5) / 65536
    theta = -51471 / 16384 + (w >> 16).double() * 6.2831854820251465 / 65536  # fastlt.noise's angle
    r = torch.sqrt(-2 * torch.log(u1))
    want_cos = torch.clamp((r * torch.cos(theta)).abs() / 3, max=1.0)
    want_sin = torch.clamp((r * torch.sin(theta)).abs() / 3, max=1.0)
    # float32 rounding of the inputs alone is ~4e-7 here; a wrong series coefficient or branch shows as >1e-4. The
    # GPU's MUFU log2/sin/cos add at most ~1.2e-6 (documented absolute errors 2^-22 and 2^-21.19 on (-pi, pi), times
    # r / 3 <= 1.62)
    tol = 2.5e-6 if FAST_MATH else 1e-6
    near_one = (w & 0xFFFF) >= 64512  # u_lo > 63/64: -log u from the series, not from log2
    for got, want in ((e_cos, want_cos), (e_sin, want_sin)):
        err = (got.cpu().double() - want).abs()
        assert err.max().item() < tol
        assert err[near_one].max().item() < tol and err[~near_one].max().item() < tol
    assert e_cos.min().item() >= 0.0 and e_sin.min().item() >= 0.0
    assert e_cos.max().item() <= 1.0 and e_sin.max().item() <= 1.0
    assert (e_cos == 1.0).any() and (e_sin == 1.0).any()  # the clip at 3 sigma is reached (small u_lo)


@triton.jit
def _noise_at_kernel(rows_ptr, cols_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    rows = tl.load(rows_ptr + i, mask=i < n, other=0)
    cols = tl.load(cols_ptr + i, mask=i < n, other=0)
    tl.store(out_ptr + i, gcl_noise_at(seed, rows, cols), mask=i < n)


def test_noise_at_one_column_per_row_equals_the_tile_noise():
    """The target logit's noise (one gathered element per row) is the tile's noise at that element."""
    seed, N, C = 2**40 + 9, 9, 203
    tile = gcl_noise_kernel(seed, N, C, DEVICE).cpu()
    gen = torch.Generator().manual_seed(0)
    rows = torch.randint(0, N, (64,), generator=gen)
    cols = torch.randint(0, C, (64,), generator=gen)
    cols[:8] = torch.arange(8)  # every position inside a Philox group
    out = torch.empty(64, device=DEVICE)
    _noise_at_kernel[(1,)](rows.to(DEVICE), cols.to(DEVICE), out, seed, 64, BLOCK=64)
    torch.testing.assert_close(out.cpu(), tile[rows, cols], atol=1e-7, rtol=0)
