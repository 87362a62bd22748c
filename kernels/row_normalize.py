"""Row L2 normalisation for the cosine heads, forward and backward, one read and one write of the matrix each.

Forward: ``y_i = x_i / max(|x_i|, eps)`` for (R, D) ``x`` (fp32/bf16/fp16, unit column stride), norms in fp32
(a row whose sum of squares overflows or underflows fp32 is summed again scaled by its largest element),
``y`` in ``x``'s dtype, plus the (R,) fp32 inverse norms. Backward:
``dx_i = (g_i - [|x_i| > eps] * y_i <g_i, y_i>) / max(|x_i|, eps)`` with ``y_i`` recomputed from ``x_i`` (fp32);
exactly 0 for D = 1 above eps (``y = sign(x)``).
A row is read twice (the second time from L2: a program holds at most ``BLOCK_R * D`` elements in flight).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .device_guard import on_its_device


@triton.jit
def _tile(row_mask, d0, D, BLOCK_D: tl.constexpr):
    """Columns ``d0 + [0, BLOCK_D)`` of a block of rows: their offsets and the (BLOCK_R, BLOCK_D) in-bounds mask."""
    cols = d0 + tl.arange(0, BLOCK_D)
    return cols, row_mask[:, None] & (cols < D)[None, :]


@triton.jit
def _load_f32(ptr, base, cols, mask):
    """A tile of the rows at ``ptr + base`` (base: (BLOCK_R, 1) row offsets), in fp32, 0 outside ``mask``."""
    return tl.load(ptr + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _normalize_fwd(x_ptr, stride_x, y_ptr, stride_y, inv_ptr, R, D, eps,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    base_x = rows.to(tl.int64)[:, None] * stride_x
    ss = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _tile(row_mask, d0, D, BLOCK_D)
        x = _load_f32(x_ptr, base_x, cols, mask)
        ss += tl.sum(x * x, 1)
    norm = tl.sqrt(ss)
    # |x|^2 overflows fp32 past |x| ~ 1.8e19, and loses its terms below 2^-126 (a zero or imprecise norm, which
    # matters only where eps < 1e-15 could leave the norm unclamped): such rows, rare, take two more passes over
    # x / max_j |x_j| (one-ulp scaling, no overflow); the common path is unchanged
    extreme = row_mask & ((ss > 3.0e38) | ((ss < 7.9e-31) & (eps < 1e-15)))
    if tl.max(extreme.to(tl.int32), 0) > 0:
        amax = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols, mask = _tile(row_mask, d0, D, BLOCK_D)
            x = _load_f32(x_ptr, base_x, cols, mask)
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        amax = tl.where(amax > 0.0, amax, 1.0)
        scaled = tl.zeros((BLOCK_R,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols, mask = _tile(row_mask, d0, D, BLOCK_D)
            x = _load_f32(x_ptr, base_x, cols, mask) / amax[:, None]
            scaled += tl.sum(x * x, 1)
        norm = tl.where(extreme, amax * tl.sqrt(scaled), norm)
    inv = tl.minimum(1.0 / tl.maximum(norm, eps), 3.4028234663852886e38)  # eps < 2.9e-39: a zero row stays 0
    tl.store(inv_ptr + rows, inv, mask=row_mask)
    base_y = rows.to(tl.int64)[:, None] * stride_y
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _tile(row_mask, d0, D, BLOCK_D)
        x = _load_f32(x_ptr, base_x, cols, mask)
        tl.store(y_ptr + base_y + cols[None, :], (x * inv[:, None]).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _normalize_bwd(x_ptr, stride_x, g_ptr, stride_g, dx_ptr, stride_dx, inv_ptr, R, D, eps,
                   BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < R
    inv = tl.load(inv_ptr + rows, mask=row_mask, other=0.0)
    unclamped = (1.0 / inv) > eps  # |x| > eps: the clamp's derivative is 0 below it
    base_x = rows.to(tl.int64)[:, None] * stride_x
    base_g = rows.to(tl.int64)[:, None] * stride_g
    dot = tl.zeros((BLOCK_R,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _tile(row_mask, d0, D, BLOCK_D)
        x = _load_f32(x_ptr, base_x, cols, mask)
        g = _load_f32(g_ptr, base_g, cols, mask)
        dot += tl.sum(g * x, 1)
    dot = tl.where(unclamped, dot * inv, 0.0)  # <g, y>
    # D = 1: y = sign(x), whose gradient is 0; the formula's g - y <g, y> leaves a few ulps of g there (times
    # 1 / |x|), which the row's scale-out makes exact
    inv_out = tl.where(unclamped & (D == 1), 0.0, inv)
    base_dx = rows.to(tl.int64)[:, None] * stride_dx
    for d0 in range(0, D, BLOCK_D):
        cols, mask = _tile(row_mask, d0, D, BLOCK_D)
        x = _load_f32(x_ptr, base_x, cols, mask)
        g = _load_f32(g_ptr, base_g, cols, mask)
        dx = (g - x * inv[:, None] * dot[:, None]) * inv_out[:, None]
        tl.store(dx_ptr + base_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _tiles(D: int) -> tuple[int, int]:
    block_d = min(tiles.next_pow2(max(D, 1)), 2048)
    block_r = max(1, min(16, 4096 // block_d))
    return block_r, block_d


@on_its_device
def normalize_rows(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, inv)``: (R, D) ``x / max(|x|, eps)`` in x's dtype and the (R,) fp32 inverse norms."""
    R, D = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((R, D), dtype=x.dtype, device=x.device)
    inv = torch.empty(R, dtype=torch.float32, device=x.device)
    if R:
        block_r, block_d = _tiles(D)
        _normalize_fwd[(tiles.cdiv(R, block_r),)](x, x.stride(0), y, y.stride(0), inv, R, D, float(eps),
                                                   BLOCK_R=block_r, BLOCK_D=block_d)
    return y, inv


@on_its_device
def normalize_rows_backward(x: torch.Tensor, inv: torch.Tensor, grad: torch.Tensor, eps: float) -> torch.Tensor:
    """d loss / d x of :func:`normalize_rows` for the upstream ``grad`` (R, D); in x's dtype."""
    R, D = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    dx = torch.empty((R, D), dtype=x.dtype, device=x.device)
    if R:
        block_r, block_d = _tiles(D)
        _normalize_bwd[(tiles.cdiv(R, block_r),)](x, x.stride(0), grad, grad.stride(0), dx, dx.stride(0), inv, R, D,
                                                   float(eps), BLOCK_R=block_r, BLOCK_D=block_d)
    return dx
