"""GCL noise for a (BLOCK_M, BLOCK_N) tile, eight values per Philox call.

Element (i, j): Philox4x32-7 (``fastlt.noise.NOISE_ROUNDS`` rounds: see there why 7) of counter
(j // 8, i, 0, 0) under the 64-bit seed (``tl.randint4x`` with the int64 offset ``(i << 32) | (j // 8)``);
each of the four words gives one Box-Muller pair, its low half the radius' uniform ``(h + 1/2) / 2^16``, its high
half the angle ``x = ANGLE_START + h ANGLE_STEP`` in (-pi, pi); column ``j`` takes normal ``j % 8`` of
``[c0, s0, c1, s1, c2, s2, c3, s3]``; then ``e = min(|g| / 3, 1)``. ``fastlt.noise`` computes the
same in plain PyTorch (see it for why 16-bit uniforms).

On the GPU the log2, sin and cos of the Box-Muller step are one special-function-unit instruction each (MUFU.LG2,
MUFU.SIN, MUFU.COS: libdevice's ``fast_*`` forms), on arguments where their documented absolute errors (2^-22 for
log2 on [1/2, 2); 2^-21.41 and 2^-21.19 for sin and cos on (-pi, pi)) keep ``e`` within ~1.5e-6. That unit
runs beside the FP32 pipes, where FP32 polynomials would cost ~30 instructions per element and leave GCL's loops
compute-bound (static count, tools/kernel_report.py: the GCL gradient loop takes 705 SASS instructions per 16
elements a thread this way, 899 with polynomials). The interpreter has no ``fast_*`` forms, so there (``FAST_MATH``
off) the same steps take numpy's exact functions; the CPU tests check that structure against float64 to 1e-6, the
GPU tests the fast path to 2.5e-6.
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..noise import ANGLE_START, ANGLE_STEP, NOISE_ROUNDS

FAST_MATH = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
ROUNDS = tl.constexpr(NOISE_ROUNDS)
_LN2 = tl.constexpr(0.6931471805599453)
# x = ANGLE_START + h ANGLE_STEP from f = 1 + h / 2^23 (the half as low mantissa bits: one LEA.HI) in one FMA:
# f 2^23 ANGLE_STEP - (2^23 ANGLE_STEP - ANGLE_START), both float32 numbers exactly (multiples of 2^-14 below 1024),
# so the exact x is rounded once, to the float32 number fastlt.noise computes in float64 and rounds
_ANGLE_SLOPE = tl.constexpr(ANGLE_STEP * 2.0**23)
_ANGLE_OFFSET = tl.constexpr(ANGLE_STEP * 2.0**23 - ANGLE_START)


@triton.jit
def _log2(x):
    if FAST_MATH:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _sin(x):
    if FAST_MATH:
        return libdevice.fast_sinf(x)
    else:
        return tl.sin(x)


@triton.jit
def _cos(x):
    if FAST_MATH:
        return libdevice.fast_cosf(x)
    else:
        return tl.cos(x)


@triton.jit
def _mul_clip(r, c):
    """``min(r * |c|, 1)`` for ``r >= 0``: on the GPU one saturating multiply (FMUL.SAT clamps the rounded product
    to [0, 1], the same number as the min), with ``|c|`` an operand modifier, so the clip costs no instruction (it
    was one FMNMX an element: GCL's bf16 statistics loop 490 -> 474 SASS per 16 elements a thread). The ``abs``
    sits inside the asm: given ``tl.abs(c)``, ptxas masks the sign bit with a LOP3 instead."""
    if FAST_MATH:
        return tl.inline_asm_elementwise("{ .reg .f32 a; abs.f32 a, $2; mul.sat.f32 $0, $1, a; }", "=f,f,f", [r, c],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return tl.minimum(r * tl.abs(c), 1.0)


@triton.jit
def _unit_float(bits):
    """``1 + bits / 2^23`` as float32, for ``bits < 2^23`` (uint32): the mantissa filled in, no conversion
    instruction (I2F shares the special-function unit's throughput)."""
    return (bits | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _r_over_3(w):
    """``r / 3 = sqrt(-2 log u / 9)`` for ``u = (lo + 1/2) / 2^16``, ``lo`` the low half of ``w``: from
    ``f = 1 + lo / 2^23`` (the half as low mantissa bits: one LOP3) both ``u = 128 f - (128 - 2^-17)`` (one FMA) and
    ``t = 1 - u`` are exact. ``-log u = -log(2) log2(u)``, except near u = 1, where ``-log u`` is small and log2's
    absolute error (2^-22 on the GPU) would be a large relative one: for ``t < 1/64`` the series
    ``t + t^2/2 + t^3/3`` (relative error < 1e-6 in ``-log u``, so ``e`` within 3e-8: ``r / 3 < 0.06`` there; a
    fourth term would buy nothing at float32's ~4e-7 and cost an FMA a pair). The 2/9 is folded into both."""
    f = _unit_float(w & 0xFFFF)
    u = f * 128.0 - (128.0 - 1.0 / 131072.0)
    t = 1.0 - u
    big = (-2.0 * _LN2 / 9.0) * _log2(u)
    small = t * (2.0 / 9.0 + t * (1.0 / 9.0 + t * (2.0 / 27.0)))
    return tl.sqrt(tl.where(t < 0.015625, small, big))


@triton.jit
def _pair(w):
    """``e = min(|g| / 3, 1)`` of one Box-Muller pair ``(r cos x, r sin x)`` from the 16-bit halves of a uint32
    word: ``r = sqrt(-2 log u)``, ``u = (h_lo + 1/2) / 2^16``, and the angle ``x = ANGLE_START + h_hi ANGLE_STEP``
    (``fastlt.noise``), which lies in (-pi, pi), where the fast sine and cosine are accurate (the CUDA math API's
    __sinf/__cosf: absolute errors 2^-21.41 and 2^-21.19 there). ``x`` is one FMA from the high half shifted into
    the low mantissa bits (:data:`_ANGLE_SLOPE`), rounded once, bit for bit the float32 angle of ``fastlt.noise``."""
    r3 = _r_over_3(w)
    x = tl.fma(_unit_float(w >> 16), _ANGLE_SLOPE, -_ANGLE_OFFSET)
    e_cos = _mul_clip(r3, _cos(x))
    e_sin = _mul_clip(r3, _sin(x))
    return e_cos, e_sin


@triton.jit
def gcl_noise_tile(seed, rows, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BY_PAIR: tl.constexpr = True):
    """(BLOCK_M, BLOCK_N) float32 noise for ``rows`` x ``[col_start, col_start + BLOCK_N)``; col_start % 8 == 0.

    The same numbers in two arrangements of the work, for the layout of the tile it meets. BY_PAIR (a tile whose
    threads hold vectors of fewer than 8 columns: fp32, or 2-byte rows of an odd width such as 8142): the four words
    of a Philox call are first spread to one per pair of columns (word k of group g to columns 8g + 2k, 8g + 2k + 1)
    and Box-Muller runs on that (BLOCK_M, BLOCK_N // 2) tensor, so the layout conversion to the tile's threads moves
    a word per pair instead of an fp32 value per element (GCL 4096 x 8142 bf16: 563 -> 539 SASS per 16 elements a
    thread with triton 3.9, 563 -> 551 with 3.6; 131072 fp32 533 -> 509 with 3.6). Else (a thread holds 8 columns,
    a whole Philox group) the four pairs are joined after Box-Muller, which triton 3.6 compiles ~2% shorter there."""
    groups = col_start // 8 + tl.arange(0, BLOCK_N // 8)
    offsets = (rows.to(tl.int64)[:, None] << 32) | groups.to(tl.int64)[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, offsets, ROUNDS)
    if BY_PAIR:
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_N // 2))  # [w0, w1, w2, w3]
        c, s = _pair(words)
        return tl.reshape(tl.join(c, s), (BLOCK_M, BLOCK_N))
    else:
        c0, s0 = _pair(w0)
        c1, s1 = _pair(w1)
        c2, s2 = _pair(w2)
        c3, s3 = _pair(w3)
        # trailing axes (a, b, t) -> normal 4a + 2b + t: [c0, s0, c1, s1, c2, s2, c3, s3]
        cos = tl.join(tl.join(c0, c2), tl.join(c1, c3))
        sin = tl.join(tl.join(s0, s2), tl.join(s1, s3))
        return tl.reshape(tl.join(cos, sin), (BLOCK_M, BLOCK_N))


@triton.jit
def gcl_noise_at(seed, rows, cols):
    """The noise of elements ``(rows[k], cols[k])`` (one column per row, e.g. the target; or broadcast
    ``rows[:, None]`` x ``cols[None, :]``, a tile whose columns start off a multiple of 8), float32: the same number
    :func:`gcl_noise_tile` gives that element (column ``j`` takes normal ``j % 8`` of the word ``(j % 8) // 2``, cos
    for even ``j``), at one Philox call per element."""
    offsets = (rows.to(tl.int64) << 32) | (cols.to(tl.int64) // 8)
    w0, w1, w2, w3 = tl.randint4x(seed, offsets, ROUNDS)
    q = cols % 8
    word = tl.where(q < 4, tl.where(q < 2, w0, w1), tl.where(q < 6, w2, w3))
    e_cos, e_sin = _pair(word)
    return tl.where(q % 2 == 0, e_cos, e_sin)


@triton.jit
def write_gcl_noise(out_ptr, seed, N, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BY_PAIR: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M),): the (N, C) noise the loss kernels use, written out (tests, debugging)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        e = gcl_noise_tile(seed, rows, start, BLOCK_M, BLOCK_N, BY_PAIR)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], e, mask=mask)


def gcl_noise_kernel(seed: int, n_rows: int, n_cols: int, device, *, by_pair: bool = True) -> "torch.Tensor":  # noqa: F821
    """(n_rows, n_cols) float32 noise as the kernels draw it; equals ``fastlt.noise.gcl_noise`` to rounding.
    ``by_pair``: :func:`gcl_noise_tile`'s arrangement (the same numbers either way)."""
    import torch

    out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device)
    if n_rows and n_cols:
        write_gcl_noise[(triton.cdiv(n_rows, 4),)](out, seed, n_rows, n_cols, BLOCK_M=4, BLOCK_N=64,
                                                   BY_PAIR=by_pair)
    return out
