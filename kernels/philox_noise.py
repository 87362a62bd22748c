"""GCL noise for a (BLOCK_M, BLOCK_N) tile, four values per Philox call.

Element (i, j): Philox4x32-10 of counter (j // 4, i, 0, 0) under the 64-bit seed (``tl.randint4x``
with the int64 offset ``(i << 32) | (j // 4)``), the four words turned into uniforms as Triton's
``uint_to_uniform_float`` does, Box-Muller on the pairs (0, 1) and (2, 3), column ``j`` taking normal
``j % 4``; then ``e = min(|g| / 3, 1)``. ``fastlt.noise`` computes the same in plain PyTorch.
"""

import triton
import triton.language as tl


@triton.jit
def _uniform(r):
    x = r.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _box_muller(u1, u2):
    u1 = tl.maximum(u1, 1.0e-7)
    theta = u2 * 6.283185307179586
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gcl_noise_tile(seed, rows, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 noise for ``rows`` x ``[col_start, col_start + BLOCK_N)``; col_start % 4 == 0."""
    groups = col_start // 4 + tl.arange(0, BLOCK_N // 4)
    offsets = (rows.to(tl.int64)[:, None] << 32) | groups.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, offsets)
    n0, n1 = _box_muller(_uniform(r0), _uniform(r1))
    n2, n3 = _box_muller(_uniform(r2), _uniform(r3))
    g = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (BLOCK_M, BLOCK_N))
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
