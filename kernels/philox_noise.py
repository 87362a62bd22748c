"""GCL noise for a (BLOCK_M, BLOCK_N) tile, eight values per Philox call.

Element (i, j): Philox4x32-10 of counter (j // 8, i, 0, 0) under the 64-bit seed (``tl.randint4x``
with the int64 offset ``(i << 32) | (j // 8)``); each of the four words gives two 16-bit uniforms
``(h + 1/2) / 2^16`` and one Box-Muller pair; column ``j`` takes normal ``j % 8`` of
``[c0, s0, c1, s1, c2, s2, c3, s3]``; then ``e = min(|g| / 3, 1)``. ``fastlt.noise`` computes the
same in plain PyTorch (see it for why 16-bit uniforms).
"""

import triton
import triton.language as tl


@triton.jit
def _pair(w):
    """One Box-Muller pair from the two 16-bit halves of a uint32 word."""
    u1 = ((w & 0xFFFF).to(tl.float32) + 0.5) * (1.0 / 65536.0)
    u2 = ((w >> 16).to(tl.float32) + 0.5) * (1.0 / 65536.0)
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = u2 * 6.283185307179586
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gcl_noise_tile(seed, rows, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 noise for ``rows`` x ``[col_start, col_start + BLOCK_N)``; col_start % 8 == 0."""
    groups = col_start // 8 + tl.arange(0, BLOCK_N // 8)
    offsets = (rows.to(tl.int64)[:, None] << 32) | groups.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, offsets)
    c0, s0 = _pair(w0)
    c1, s1 = _pair(w1)
    c2, s2 = _pair(w2)
    c3, s3 = _pair(w3)
    # trailing axes (a, b, t) -> normal 4a + 2b + t: [c0, s0, c1, s1, c2, s2, c3, s3]
    cos = tl.join(tl.join(c0, c2), tl.join(c1, c3))
    sin = tl.join(tl.join(s0, s2), tl.join(s1, s3))
    g = tl.reshape(tl.join(cos, sin), (BLOCK_M, BLOCK_N))
    return tl.minimum(tl.abs(g) * (1.0 / 3.0), 1.0)


@triton.jit
def write_gcl_noise(out_ptr, seed, N, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M),): the (N, C) noise the loss kernels use, written out (tests, debugging)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        e = gcl_noise_tile(seed, rows, start, BLOCK_M, BLOCK_N)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], e, mask=mask)


def gcl_noise_kernel(seed: int, n_rows: int, n_cols: int, device) -> "torch.Tensor":  # noqa: F821
    """(n_rows, n_cols) float32 noise as the kernels draw it; equals ``fastlt.noise.gcl_noise`` to rounding."""
    import torch

    out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device)
    if n_rows and n_cols:
        write_gcl_noise[(triton.cdiv(n_rows, 4),)](out, seed, n_rows, n_cols, BLOCK_M=4, BLOCK_N=64)
    return out
