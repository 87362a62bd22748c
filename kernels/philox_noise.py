"""GCL noise for a (BLOCK_M, BLOCK_N) tile, eight values per Philox call (two calls per 8 columns for a class shard
that starts off a multiple of 8), from the table of levels.

Element (i, j): Philox4x32-7 (``fastlt.noise.NOISE_ROUNDS`` rounds: see there why 7) of counter (j // 8, i, 0, 0)
under the 64-bit seed (:func:`philox4x32`: ``tl.randint4x``'s words for the int64 offset ``(i << 32) | (j // 8)``,
for 16-bit rows with each 32 x 32-bit product in one wide multiply); column ``j`` takes the 16-bit half of word
``(j % 8) // 2`` (low for even ``j``), its bits 2 to 12 the level ``k``, and ``e = T[k]``, the (2048,) float32 table
``fastlt.noise.noise_table`` (the clipped half-normal's quantiles). ``fastlt.noise`` computes the same in plain
PyTorch; both read the same table, so the numbers agree bit for bit, on the GPU too.

The loss kernels load the table once per program (:func:`load_noise_table`: 16 registers a thread at 128 threads)
and look levels up with ``tl.gather``, which goes through shared memory (8 KB): a shift, a mask and a
shared-memory load an element, where Box-Muller took a log, a square root, a sine and a cosine a pair and ~10 FP32
and integer instructions an element (GCL's bf16 statistics loop 26.3 -> 20.0 SASS an element;
tools/kernel_report.py).
"""

import triton
import triton.language as tl

from ..noise import LEVEL_SHIFT, NOISE_LEVELS, NOISE_ROUNDS, noise_table

ROUNDS = tl.constexpr(NOISE_ROUNDS)
LEVELS = tl.constexpr(NOISE_LEVELS)
_SHIFT = tl.constexpr(LEVEL_SHIFT)
_KEY_A, _KEY_B = tl.constexpr(0x9E3779B9), tl.constexpr(0xBB67AE85)  # Philox4x32's (Random123)
_ROUND_A, _ROUND_B = tl.constexpr(0xD2511F53), tl.constexpr(0xCD9E8D57)


@triton.jit
def _mul_hi_lo(c, M: tl.constexpr, WIDE: tl.constexpr):
    """The high and low words of ``c * M`` (uint32 ``c``, a 32-bit constant ``M``). WIDE: from one 32 x 32 -> 64-bit
    multiply (an ``IMAD.WIDE.U32``); else as ``tl.randint4x`` takes them, ``umulhi`` and a 32-bit multiply, which
    mostly compile to two instructions but hold no register pair."""
    if WIDE:
        p = c.to(tl.uint64) * M
        hi, lo = (p >> 32).to(tl.uint32), p.to(tl.uint32)
    else:
        hi, lo = tl.math.umulhi(c, M), tl.core.mul(c, M, sanitize_overflow=False)  # (wraps by design: no debug check)
    return hi, lo


@triton.jit
def philox4x32(seed, c0, c1, ROUNDS_: tl.constexpr, WIDE: tl.constexpr):
    """Philox4x32-ROUNDS_ of counter ``(c0, c1, 0, 0)`` (uint32 tensors, broadcast together) under the 64-bit
    ``seed`` (its low word the first key word): the four uint32 words of ``tl.randint4x(seed, (c1 << 32) | c0,
    ROUNDS_)`` (``fastlt.noise.philox4x32``'s numbers). Each round is four products and two three-way XORs; WIDE
    (:func:`_mul_hi_lo`) takes the products in two wide multiplies: GCL's bf16 statistics loop 20.0 -> 18.4 SASS an
    element at C = 131072, 22.8 -> 21.9 at 8142 (kernel_report, triton 3.9). The loss kernels pass WIDE for 16-bit
    logits only (docs/design.md, "Noise": fp32 tiles spilled)."""
    c0, c1 = tl.broadcast(c0, c1)
    seed = tl.cast(seed, tl.uint64)  # (a tensor, or a constant: a seed of 1 may come specialised)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    # the first round, with c2 = c3 = 0: B * c2 is 0
    hi, lo = _mul_hi_lo(c0, _ROUND_A, WIDE)
    x0, x1, x2, x3 = c1 ^ k0, tl.zeros_like(c0), hi ^ k1, lo
    for _ in tl.static_range(ROUNDS_ - 1):
        k0 = tl.add(k0, _KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, _KEY_B, sanitize_overflow=False)
        hi_b, lo_b = _mul_hi_lo(x2, _ROUND_B, WIDE)
        hi_a, lo_a = _mul_hi_lo(x0, _ROUND_A, WIDE)
        x0, x1, x2, x3 = hi_b ^ x1 ^ k0, lo_b, hi_a ^ x3 ^ k1, lo_a
    return x0, x1, x2, x3


@triton.jit
def load_noise_table(table_ptr):
    """The (LEVELS,) float32 table of levels at ``table_ptr``, held by the program's threads."""
    return tl.load(table_ptr + tl.arange(0, LEVELS))


@triton.jit
def _levels(words):
    """The levels of a uint32 word's two halves: ``(low >> 2) & 2047`` and ``(high >> 2) & 2047``."""
    return (words >> _SHIFT) & (LEVELS - 1), (words >> (16 + _SHIFT)) & (LEVELS - 1)


@triton.jit
def _half_level(w0, w1, w2, w3, H: tl.constexpr):
    """The level of half H (0..7: word H // 2, its low half for even H) of a Philox call's four words."""
    if H // 2 == 0:
        w = w0
    elif H // 2 == 1:
        w = w1
    elif H // 2 == 2:
        w = w2
    else:
        w = w3
    low, high = _levels(w)
    if H % 2 == 0:
        level = low
    else:
        level = high
    return level


@triton.jit
def _shifted_level(a0, a1, a2, a3, b0, b1, b2, b3, K: tl.constexpr, SHIFT: tl.constexpr):
    """The level of column K of a tile's group of 8 columns that starts SHIFT columns into its Philox group: half
    K + SHIFT of that group's call (a), or past the 8th, of the next group's (b)."""
    if K + SHIFT < 8:
        level = _half_level(a0, a1, a2, a3, K + SHIFT)
    else:
        level = _half_level(b0, b1, b2, b3, K + SHIFT - 8)
    return level


@triton.jit
def gcl_noise_tile(seed, table, rows, col_start, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   SHIFT: tl.constexpr = 0, WIDE: tl.constexpr = True):
    """(BLOCK_M, BLOCK_N) float32 noise for ``rows`` x ``[col_start, col_start + BLOCK_N)``; col_start % 8 == SHIFT.
    ``table``: :func:`load_noise_table`. SHIFT 0: the four words of a Philox call are spread to one per pair of
    columns (word k of group g to columns 8g + 2k, 8g + 2k + 1), split in the pair's two levels, and looked up at
    once. SHIFT 1..7 (a class shard that starts off a multiple of 8): each group of 8 columns of the tile takes the
    halves SHIFT.. of its Philox group's call and the first SHIFT halves of the next group's, both drawn per group
    (two calls per 8 columns, where the shard's tiles drew one per column before). WIDE: :func:`philox4x32`'s."""
    groups = (col_start // 8 + tl.arange(0, BLOCK_N // 8)).to(tl.uint32)[None, :]
    rows = rows.to(tl.uint32)[:, None]
    w0, w1, w2, w3 = philox4x32(seed, groups, rows, ROUNDS, WIDE)
    if SHIFT == 0:
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_N // 2))  # [w0, w1, w2, w3]
        low, high = _levels(words)
        levels = tl.reshape(tl.join(low, high), (BLOCK_M * BLOCK_N,))
    else:
        b0, b1, b2, b3 = philox4x32(seed, groups + 1, rows, ROUNDS, WIDE)  # the next group
        x0 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 0, SHIFT)
        x1 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 1, SHIFT)
        x2 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 2, SHIFT)
        x3 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 3, SHIFT)
        x4 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 4, SHIFT)
        x5 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 5, SHIFT)
        x6 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 6, SHIFT)
        x7 = _shifted_level(w0, w1, w2, w3, b0, b1, b2, b3, 7, SHIFT)
        # joined so that the last three axes (4a + 2b + c) flatten to columns 0..7 of each group
        levels = tl.reshape(tl.join(tl.join(tl.join(x0, x4), tl.join(x2, x6)), tl.join(tl.join(x1, x5),
                                                                                       tl.join(x3, x7))),
                            (BLOCK_M * BLOCK_N,))
    return tl.reshape(tl.gather(table, levels, 0), (BLOCK_M, BLOCK_N))


@triton.jit
def gcl_noise_at(seed, table_ptr, rows, cols):
    """The noise of elements ``(rows[k], cols[k])`` (one column per row: the target's), float32: the number
    :func:`gcl_noise_tile` gives that element, at one Philox call and one load from the table in global memory (an
    L1 hit) per element."""
    # not WIDE: with the wide form here, triton 3.9 kept the round keys in registers across the loss kernels' loops
    w0, w1, w2, w3 = philox4x32(seed, (cols // 8).to(tl.uint32), rows.to(tl.uint32), ROUNDS, False)
    q = cols % 8
    word = tl.where(q < 4, tl.where(q < 2, w0, w1), tl.where(q < 6, w2, w3))
    low, high = _levels(word)
    return tl.load(table_ptr + tl.where(q % 2 == 0, low, high))


@triton.jit
def write_gcl_noise(out_ptr, seed, table_ptr, N, C, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M),): the (N, C) noise the loss kernels use, written out (tests, debugging)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    table = load_noise_table(table_ptr)
    for start in range(0, C, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        e = gcl_noise_tile(seed, table, rows, start, BLOCK_M, BLOCK_N)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        tl.store(out_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], e, mask=mask)


def gcl_noise_kernel(seed: int, n_rows: int, n_cols: int, device) -> "torch.Tensor":  # noqa: F821
    """(n_rows, n_cols) float32 noise as the kernels draw it; equals ``fastlt.noise.gcl_noise`` bit for bit."""
    import torch

    out = torch.empty((n_rows, n_cols), dtype=torch.float32, device=device)
    if n_rows and n_cols:
        write_gcl_noise[(triton.cdiv(n_rows, 4),)](out, seed, noise_table(device), n_rows, n_cols, BLOCK_M=4,
                                                   BLOCK_N=64)
    return out
