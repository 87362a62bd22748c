"""The SPEC 2.4 row operator as Triton kernels.

On (N, C) logits ``z`` (fp32/bf16/fp16, any strides) and int targets ``y``:
``a_ij = s * (z_ij + tau*prior_j - noise_mul*cloud_j*e_ij - m_i*[j == y_i])``,
``loss_i = focal_i * ((1 - eps) * w_{y_i} * (LSE_j a_ij - a_{i,y_i}) + eps/C * sum_j w_j (LSE_j a_ij - a_ij))``,
``focal_i = (1 - p_{i,y_i})^gamma`` (detached), 0 for ignored rows. Gradient w.r.t. ``z``:
``s * coef_i * ((1 - eps) * w_y * (p_ij - [j == y_i]) + eps/C * (W * p_ij - w_j))``, ``W = sum_j w_j``,
``coef_i = focal_i * upstream_i`` (``/ sum_i w_{y_i}`` for 'mean'). Statistics are fp32; the ``-1`` of
the target is folded in fp32 before the gradient is cast to the logits' dtype. Offsets are int64.

Kernels: ``row_loss_forward`` (one pass; a row may be split over ``NUM_SPLITS`` programs whose
partial (max, sum-exp) are merged by ``row_loss_combine``; optionally the gradient in the same
launch, and LADE's per-column partial statistics; the batch loss from the launch's last program, so a
forward is one launch), ``row_loss_grad`` (recompute backward, plus LADE's column term),
``reduce_rows`` (the batch reductions as a launch of their own, where the row kernel cannot do them) and
``scale_rows`` (multiply up to three stored gradients by grad_output, skipped when 1).
Flags are constexpr (an off flag costs nothing); every float hyperparameter is a runtime argument.
"""

import triton
import triton.language as tl

from .philox_noise import gcl_noise_at, gcl_noise_tile

# The start of every running max: the most negative finite float32, so any finite logit (torch.finfo(dtype).min,
# the usual masking value, too) is >= it, while exp(m_old - m_new) stays NaN-free where only -inf was seen. (It was
# -1e30, above a row masked with finfo.min, whose loss then came out -inf and its gradient inf.)
NEG_BIG: tl.constexpr = tl.constexpr(-3.4028234663852886e38)
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def _exp(x):
    """``exp(x)`` as one ``MUFU.EX2`` (fp32). ``tl.exp`` lowers to ``ex2.approx.f32``, which ptxas follows with a
    three-instruction fix-up per element for results below 2^-126; ``exp2`` flushes those denormals to 0 (they
    add nothing to a sum that holds a 1 and flush in any half-precision gradient). Same value otherwise."""
    return tl.math.exp2(x * LOG2E)


@triton.jit
def _row_info(y_ptr, margin_ptr, weight_ptr, rows, N, C, ignore_index, margin_value,
              MARGIN_MODE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Per-row target (clamped to 0 when ignored), validity, margin m_i and class weight w_{y_i}."""
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (y != ignore_index)
    in_range = (y >= 0) & (y < C)
    y = tl.where(valid & in_range, y, 0)
    if MARGIN_MODE == 2:
        m = tl.load(margin_ptr + y, mask=valid, other=0.0).to(tl.float32)
    else:
        m = tl.zeros(rows.shape, tl.float32) + margin_value
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=valid, other=0.0).to(tl.float32)
    else:
        w_y = tl.full(rows.shape, 1.0, tl.float32)
    # a target outside [0, C) is never loaded through: its row's loss and gradient become NaN (the GPU
    # path cannot raise without a host sync; the CPU path raises ValueError before launching)
    w_y = tl.where(valid & ~in_range, float("nan"), w_y)
    return y, valid, row_mask, m, w_y


@triton.jit
def _load_tile(x_ptr, stride_m, stride_n, rows, row_mask, col_start, col_base, col_hi, MASK_COLS: tl.constexpr,
               ALIGN: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(x fp32, cols, col_mask, mask)``: the (rows, BLOCK_N) tile of an (N, C) operand holding classes from
    ``col_base`` on, columns from ``col_start``, masked at ``col_hi`` only when MASK_COLS (see
    :func:`_adjusted_tile`)."""
    cols = col_start + tl.arange(0, BLOCK_N)
    if MASK_COLS:
        col_mask = cols < col_hi
    else:
        col_mask = tl.full((BLOCK_N,), True, tl.int1)
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(x_ptr + _tile_offsets(rows, stride_m, stride_n, cols, col_base, ALIGN), mask=mask, other=0.0)
    return x.to(tl.float32), cols, col_mask, mask


@triton.jit
def _tile_offsets(rows, stride_m, stride_n, cols, col_base, ALIGN: tl.constexpr):
    """int64 element offsets of a tile (rows x cols, classes from ``col_base`` on) of an (N, C) operand."""
    return _row_offsets(rows, stride_m, ALIGN)[:, None] + (cols - col_base).to(tl.int64)[None, :] * stride_n


@triton.jit
def _holds_target(y, col_start, BLOCK_N: tl.constexpr):
    """Whether a target of the tile's rows lies in its columns ``[col_start, col_start + BLOCK_N)``, a scalar: only
    such a tile (one per row) needs the per-element compare with the target (margin, one-hot), which otherwise
    costs ~3 instructions per element in every tile."""
    return tl.sum(((y >= col_start) & (y < col_start + BLOCK_N)).to(tl.int32), 0) > 0


@triton.jit
def _adjusted_tile(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, rows, row_mask, col_start, col_base, y, m,
                   col_hi, tau, noise_mul, scale, seed, noise_row0,
                   HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
                   MASK_COLS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Load a tile of z and return (z fp32, a fp32 with -inf outside the matrix, cols, col_mask, mask). ``cols``
    are global class indices, masked at ``col_hi`` (the end of this program's columns) when MASK_COLS; a tile
    that lies wholly inside them passes MASK_COLS=False, so the (C,) vectors load unmasked and the loads of z
    are masked per row only (both vectorise at any C). z holds the classes from ``col_base`` on (0 unless the
    caller passes a class chunk); ALIGN: a power of two dividing its row stride (lets odd-C rows vectorise).
    HAS_SCALE: multiply by ``scale`` (off when it is 1)."""
    z, cols, col_mask, mask = _load_tile(z_ptr, stride_zm, stride_zn, rows, row_mask, col_start, col_base, col_hi,
                                         MASK_COLS, ALIGN, BLOCK_N)
    a = z
    if HAS_PRIOR:
        a += tau * tl.load(prior_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_NOISE:
        cloud = tl.load(cloud_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        a -= (noise_mul * cloud)[None, :] * gcl_noise_tile(seed, rows + noise_row0, col_start, BLOCK_M, BLOCK_N)
    if MARGIN_MODE != 0:
        if _holds_target(y, col_start, BLOCK_N):
            a -= tl.where(cols[None, :] == y[:, None], m[:, None], 0.0)
    if HAS_SCALE:
        a = a * scale
    if MASK_COLS or BLOCK_M > 1:  # a whole tile of one row (the grid has exactly N rows) has nothing to mask
        a = tl.where(mask, a, float("-inf"))
    return z, a, cols, col_mask, mask


@triton.jit
def _target_logit(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, rows, row_mask, col_base, y, m, col_lo, col_hi,
                  tau, noise_mul, scale, seed, noise_row0,
                  HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr):
    """``(a_{i, y_i}, z_{i, y_i})`` (fp32) for the rows whose target lies in ``[col_lo, col_hi)``, 0 elsewhere:
    one gathered element per row, the same arithmetic as :func:`_adjusted_tile` (so no per-element
    compare-and-sum), and the raw logit (LADE's class sums)."""
    here = row_mask & (y >= col_lo) & (y < col_hi)
    offs = rows.to(tl.int64) * stride_zm + (y - col_base) * stride_zn
    z = tl.load(z_ptr + offs, mask=here, other=0.0).to(tl.float32)
    a = z
    if HAS_PRIOR:
        a += tau * tl.load(prior_ptr + y, mask=here, other=0.0).to(tl.float32)
    if HAS_NOISE:
        cloud = tl.load(cloud_ptr + y, mask=here, other=0.0).to(tl.float32)
        a -= (noise_mul * cloud) * gcl_noise_at(seed, rows + noise_row0, y)
    if MARGIN_MODE != 0:
        a -= m
    return tl.where(here, a * scale, 0.0), z


@triton.jit
def _weight_sum(wsum_ptr, C, HAS_WEIGHT: tl.constexpr):
    """W = sum_j w_j (precomputed on the device), or C without weights."""
    if HAS_WEIGHT:
        w_sum = tl.load(wsum_ptr)
    else:
        w_sum = C * 1.0
    return w_sum


@triton.jit
def _finish_rows(row_max, log_sum, a_y, sw, w_y, valid, w_sum, gamma, label_smoothing, inv_C,
                 HAS_SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr):
    """Per-row loss (0 when ignored) and focal factor (0 when ignored) from the row statistics."""
    ce = (row_max - a_y) + log_sum  # LSE - a_y without rounding LSE at the logits' magnitude
    loss = (1.0 - label_smoothing) * w_y * ce
    if HAS_SMOOTH:
        loss += label_smoothing * inv_C * (w_sum * (row_max + log_sum) - sw)
    focal = tl.full(ce.shape, 1.0, tl.float32)
    if HAS_FOCAL:
        base = tl.maximum(1.0 - _exp(-ce), 0.0)
        focal = tl.where(base > 0.0, tl.exp2(gamma * tl.log2(base)), 0.0)
        loss = loss * focal
    return tl.where(valid, loss, 0.0), tl.where(valid, focal, 0.0)


@triton.jit
def _finish_and_store_rows(row_max, log_sum, a_y, sw, w_y, valid, rows, row_mask, N, C, wsum_ptr, inv_denom_ptr,
                           own_inv, loss_ptr, lse_ptr, factor_ptr, gamma, label_smoothing,
                           HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr,
                           MEAN: tl.constexpr, OWN_DENOM: tl.constexpr):
    """Finish the rows (:func:`_finish_rows`; the factor times 1 / sum w_{y_i} when MEAN: :func:`_mean_inverse`)
    and store loss, (row max, log sum-exp) and factor. Returns the factor, for a gradient in the same launch."""
    w_sum = _weight_sum(wsum_ptr, C, HAS_WEIGHT)
    loss, factor = _finish_rows(row_max, log_sum, a_y, sw, w_y, valid, w_sum, gamma, label_smoothing,
                                1.0 / (C * 1.0), HAS_SMOOTH, HAS_FOCAL)
    if MEAN:  # an ignored row stays 0 when no row is valid (1 / sum w = inf): zero gradients, as torch gives
        factor = tl.where(valid, factor * _mean_inverse(inv_denom_ptr, own_inv, OWN_DENOM), 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(lse_ptr + rows, row_max, mask=row_mask)
    tl.store(lse_ptr + N + rows, log_sum, mask=row_mask)
    tl.store(factor_ptr + rows, factor, mask=row_mask)
    return factor


@triton.jit
def _grad_tile(a, z, row_max, log_sum, y, cols, col_mask, mask, coef, w_y, weight_ptr, w_sum, scale,
               label_smoothing, inv_C, valid, col_a_y, col_b_ptr, col_lse_ptr, col_go,
               HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, COLUMN_TERM: tl.constexpr, TARGET: tl.constexpr):
    """d loss / d z for one tile, fp32 (the target's -1 folded here, before any downcast). COLUMN_TERM (LADE):
    plus ``col_a_y * [j == y_i] + col_go * col_b_j * exp(z_ij - col_lse_j)`` on valid rows (``col_a_y``
    (BLOCK_M,): the target class's ``col_a``, gathered once per row and already times ``col_go``, the scalar
    upstream gradient of the loss). TARGET: the tile may hold a target (:func:`_holds_target`); without it the
    one-hot terms are left out."""
    p = _exp((a - row_max[:, None]) - log_sum[:, None])  # a - max is exact for the large entries
    return _grad_from_p(p, z, y, cols, col_mask, coef, w_y, weight_ptr, w_sum, scale, label_smoothing, inv_C, valid,
                        col_a_y, col_b_ptr, col_lse_ptr, col_go, HAS_WEIGHT, HAS_SMOOTH, COLUMN_TERM, TARGET)


@triton.jit
def _grad_from_p(p, z, y, cols, col_mask, coef, w_y, weight_ptr, w_sum, scale, label_smoothing, inv_C, valid, col_a_y,
                 col_b_ptr, col_lse_ptr, col_go, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                 COLUMN_TERM: tl.constexpr, TARGET: tl.constexpr):
    """:func:`_grad_tile` from the tile's probabilities ``p`` (fp32)."""
    d = p
    if TARGET:
        d = p - (cols[None, :] == y[:, None]).to(tl.float32)
    d = (1.0 - label_smoothing) * w_y[:, None] * d
    if HAS_SMOOTH:
        if HAS_WEIGHT:
            w_j = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            d += label_smoothing * inv_C * (w_sum * p - w_j[None, :])
        else:
            d += label_smoothing * inv_C * (w_sum * p - 1.0)
    g = d * (coef * scale)[:, None]
    if COLUMN_TERM:
        col_b = tl.load(col_b_ptr + cols, mask=col_mask, other=0.0) * col_go
        col_lse = tl.load(col_lse_ptr + cols, mask=col_mask, other=0.0)
        q = _exp(z - col_lse[None, :])
        t = col_b[None, :] * q
        if TARGET:
            t += tl.where(cols[None, :] == y[:, None], col_a_y[:, None], 0.0)
        g += tl.where(valid[:, None], t, 0.0)
    return g


@triton.jit
def _row_offsets(rows, stride, ALIGN: tl.constexpr):
    """int64 ``rows * stride``, declared a multiple of ALIGN (the launcher checks the stride) so that rows of an odd
    width (C = 8142) still load and store in 2- or 4-element vectors."""
    offs = rows.to(tl.int64) * stride
    if ALIGN > 1:
        offs = tl.multiple_of(offs, ALIGN)
    return offs


@triton.jit
def _store_grad(grad_ptr, stride_gm, stride_gn, rows, cols, col_base, mask, g, ALIGN: tl.constexpr):
    tl.store(grad_ptr + _tile_offsets(rows, stride_gm, stride_gn, cols, col_base, ALIGN),
             g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _tile_stats(z, a, cols, col_mask, mask, y, valid, m_i, l_i, sw, weight_ptr, colstat_ptr, pid_m, num_row_blocks,
                C, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, COLUMN_STATS: tl.constexpr):
    """Fold one tile into the running row statistics (max, sum-exp, smoothing sum) and, for LADE,
    store its column partials (max z, sum exp(z - max) over the valid rows). LADE's class sums and counts
    come from the gathered target logits instead (one element per row, not a compare per element). Returns the
    new (max, sum-exp, smoothing sum) and the tile's ``exp(a - max)`` (what :func:`_stats_step` stores with
    STORE_P)."""
    m_new = tl.maximum(m_i, tl.max(a, 1))
    e = _exp(a - m_new[:, None])
    l_i = l_i * _exp(m_i - m_new) + tl.sum(e, 1)
    if HAS_SMOOTH:
        if HAS_WEIGHT:
            w_j = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            sw += tl.sum(tl.where(mask, a * w_j[None, :], 0.0), 1)
        else:
            sw += tl.sum(tl.where(mask, a, 0.0), 1)
    if COLUMN_STATS:
        vmask = mask & valid[:, None]
        zc = tl.where(vmask, z, float("-inf"))
        c_max = tl.maximum(tl.max(zc, 0), NEG_BIG)
        c_sum = tl.sum(_exp(zc - c_max[None, :]), 0)
        base = colstat_ptr + tl.cast(pid_m, tl.int64) * C + cols
        tl.store(base, c_max, mask=col_mask)
        tl.store(base + tl.cast(num_row_blocks, tl.int64) * C, c_sum, mask=col_mask)
    return m_new, l_i, sw, e


@triton.jit
def _stats_step(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, colstat_ptr, rows, row_mask, col_start,
                col_base, col_hi, y, m, valid, m_i, l_i, sw, pid_m, num_row_blocks, C, tau, noise_mul, scale, seed,
                noise_row0, grad_ptr, stride_gm, stride_gn, tile_max_ptr, tile, num_tiles,
                HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr,
                HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, COLUMN_STATS: tl.constexpr,
                STORE_P: tl.constexpr, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """One tile of the statistics pass: load it (:func:`_adjusted_tile`) and fold it in (:func:`_tile_stats`).
    STORE_P: also store ``exp(a - max)`` over the tile of ``grad_ptr`` and the running max (the tile's ``max``) at
    ``tile_max_ptr[row, tile]`` ((N, num_tiles) fp32), for :func:`_grad_step`'s STORED pass."""
    z, a, cols, col_mask, mask = _adjusted_tile(
        z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, rows, row_mask, col_start, col_base, y, m, col_hi, tau,
        noise_mul, scale, seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, MASK_COLS, ALIGN, BLOCK_M,
        BLOCK_N)
    m_i, l_i, sw, e = _tile_stats(z, a, cols, col_mask, mask, y, valid, m_i, l_i, sw, weight_ptr, colstat_ptr, pid_m,
                                  num_row_blocks, C, HAS_WEIGHT, HAS_SMOOTH, COLUMN_STATS)
    if STORE_P:
        _store_grad(grad_ptr, stride_gm, stride_gn, rows, cols, col_base, mask, e, ALIGN)
        tl.store(tile_max_ptr + rows.to(tl.int64) * num_tiles + tile, m_i, mask=row_mask)
    return m_i, l_i, sw


@triton.jit
def _grad_step(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, grad_ptr, stride_gm, stride_gn, rows,
               row_mask, col_start, col_base, col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C, col_a_y,
               col_b_ptr, col_lse_ptr, col_go, tau, noise_mul, scale, label_smoothing, seed, noise_row0, tile_max_ptr,
               tile, num_tiles,
               HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, COLUMN_TERM: tl.constexpr, STORED: tl.constexpr,
               MASK_COLS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of a gradient pass: recompute it, write ``coef * d loss / d z`` (plus LADE's column term).
    STORED (gradient in the forward, after a STORE_P statistics pass): the tile is not recomputed (no z, class
    vectors or noise): ``p = e * exp(max_tile - row max - log sum-exp)`` from the ``e = exp(a - max_tile)`` that pass
    stored over ``grad_ptr`` and its running max ``tile_max_ptr[row, tile]``. Rounding ``e`` to the gradient's dtype
    costs ``p`` one rounding more, relative to ``p``; a confident target keeps ``p_y - 1`` exact: its ``a`` was the
    running max where it was stored, so its ``e`` is exactly 1."""
    # two versions of the tile's work: the one tile per row that holds its target, with the compares (margin,
    # one-hot), and every other tile without them (a branch per tile, not ~3 instructions per element)
    if STORED:
        e, cols, col_mask, mask = _load_tile(grad_ptr, stride_gm, stride_gn, rows, row_mask, col_start, col_base,
                                             col_hi, MASK_COLS, ALIGN, BLOCK_N)
        m_t = tl.load(tile_max_ptr + rows.to(tl.int64) * num_tiles + tile, mask=row_mask, other=0.0)
        p = e * _exp((m_t - row_max) - log_sum)[:, None]
        if _holds_target(y, col_start, BLOCK_N):
            g = _grad_from_p(p, e, y, cols, col_mask, coef, w_y, weight_ptr, w_sum, scale, label_smoothing, inv_C,
                             valid, col_a_y, col_b_ptr, col_lse_ptr, col_go, HAS_WEIGHT, HAS_SMOOTH, False, True)
        else:
            g = _grad_from_p(p, e, y, cols, col_mask, coef, w_y, weight_ptr, w_sum, scale, label_smoothing, inv_C,
                             valid, col_a_y, col_b_ptr, col_lse_ptr, col_go, HAS_WEIGHT, HAS_SMOOTH, False, False)
    else:
        if _holds_target(y, col_start, BLOCK_N):
            g, cols, mask = _recomputed_grad(
                z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, rows, row_mask, col_start, col_base,
                col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C, col_a_y, col_b_ptr, col_lse_ptr,
                col_go, tau, noise_mul, scale, label_smoothing, seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE,
                HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, COLUMN_TERM, True, MASK_COLS, ALIGN, BLOCK_M, BLOCK_N)
        else:
            g, cols, mask = _recomputed_grad(
                z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, rows, row_mask, col_start, col_base,
                col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C, col_a_y, col_b_ptr, col_lse_ptr,
                col_go, tau, noise_mul, scale, label_smoothing, seed, noise_row0, HAS_PRIOR, HAS_NOISE, 0,
                HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, COLUMN_TERM, False, MASK_COLS, ALIGN, BLOCK_M, BLOCK_N)
    _store_grad(grad_ptr, stride_gm, stride_gn, rows, cols, col_base, mask, g, ALIGN)


@triton.jit
def _recomputed_grad(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, rows, row_mask, col_start,
                     col_base, col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C, col_a_y, col_b_ptr,
                     col_lse_ptr, col_go, tau, noise_mul, scale, label_smoothing, seed, noise_row0,
                     HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr,
                     COLUMN_TERM: tl.constexpr, TARGET: tl.constexpr, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile recomputed (:func:`_adjusted_tile`) and its gradient (:func:`_grad_tile`): ``(g, cols, mask)``.
    TARGET off (a tile without a target; MARGIN_MODE 0 then too): no compare with the target at all."""
    z, a, cols, col_mask, mask = _adjusted_tile(
        z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, rows, row_mask, col_start, col_base, y, m, col_hi, tau,
        noise_mul, scale, seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, MASK_COLS, ALIGN,
        BLOCK_M, BLOCK_N)
    g = _grad_tile(a, z, row_max, log_sum, y, cols, col_mask, mask, coef, w_y, weight_ptr, w_sum, scale,
                   label_smoothing, inv_C, valid, col_a_y, col_b_ptr, col_lse_ptr, col_go, HAS_WEIGHT, HAS_SMOOTH,
                   COLUMN_TERM, TARGET)
    return g, cols, mask


@triton.jit
def _full_tiles_end(col_lo, col_hi, BLOCK_N: tl.constexpr):
    """End of the whole tiles in ``[col_lo, col_hi)``: they need no column mask; a last partial tile follows."""
    return col_lo + ((col_hi - col_lo) // BLOCK_N) * BLOCK_N


@triton.jit
def _grad_columns(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, grad_ptr, stride_gm, stride_gn, rows,
                  row_mask, col_lo, col_base, col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C,
                  col_a_y, col_b_ptr, col_lse_ptr, col_go, tau, noise_mul, scale, label_smoothing, seed,
                  noise_row0, tile_max_ptr, num_tiles, HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr,
                  MARGIN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_SMOOTH: tl.constexpr, COLUMN_TERM: tl.constexpr, STORED: tl.constexpr, ALIGN: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """A gradient pass over columns ``[col_lo, col_hi)`` (:func:`_grad_step`), **from the last column back**: the
    masked partial tile, then the whole tiles unmasked in descending order. The statistics pass just read the row
    front to back, so its most recent tiles (the ones most likely still in L2) are re-read first. Shared by the
    gradient-in-forward and the recompute backward (which also walks the rows backwards, see
    :func:`row_loss_grad`). STORED: from what a STORE_P statistics pass left (see :func:`_grad_step`)."""
    full_end = _full_tiles_end(col_lo, col_hi, BLOCK_N)
    num_full = (full_end - col_lo) // BLOCK_N
    tile0 = (col_lo - col_base) // BLOCK_N  # the tiles of STORED are numbered from col_base (all splits of a row)
    if full_end < col_hi:
        _grad_step(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, grad_ptr, stride_gm, stride_gn,
                   rows, row_mask, full_end, col_base, col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C,
                   col_a_y, col_b_ptr, col_lse_ptr, col_go, tau, noise_mul, scale, label_smoothing, seed, noise_row0,
                   tile_max_ptr, tile0 + num_full, num_tiles, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT,
                   HAS_SMOOTH, COLUMN_TERM, STORED, True, ALIGN, BLOCK_M, BLOCK_N)
    col_start = full_end
    for t in range(0, num_full):
        col_start -= BLOCK_N
        _grad_step(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, grad_ptr, stride_gm, stride_gn,
                   rows, row_mask, col_start, col_base, col_hi, y, m, valid, row_max, log_sum,
                   coef, w_y, w_sum, inv_C, col_a_y, col_b_ptr, col_lse_ptr, col_go, tau, noise_mul, scale,
                   label_smoothing, seed, noise_row0, tile_max_ptr, tile0 + num_full - 1 - t, num_tiles, HAS_PRIOR,
                   HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, COLUMN_TERM, STORED, False, ALIGN,
                   BLOCK_M, BLOCK_N)


@triton.jit
def _forward_row_block(
    pid_m, pid_s,
    z_ptr, stride_zm, stride_zn, y_ptr, prior_ptr, cloud_ptr, margin_ptr, weight_ptr, wsum_ptr, inv_denom_ptr,
    own_inv, loss_ptr, lse_ptr, factor_ptr, part_ptr, colstat_ptr, zy_ptr, grad_ptr, stride_gm, stride_gn,
    tile_max_ptr, num_tiles, N, C, cols_per_split, col_base, col_end, split_base, total_splits, num_row_blocks,
    ignore_index, tau, noise_mul, margin_value, scale, gamma, label_smoothing, seed, noise_row0,
    HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, MEAN: tl.constexpr,
    SPLIT: tl.constexpr,
    SINGLE_TILE: tl.constexpr, GRAD_IN_FWD: tl.constexpr, COLUMN_STATS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, OWN_DENOM: tl.constexpr, STORE_P: tl.constexpr,
):
    """The work of program (pid_m, pid_s) of :func:`row_loss_forward`: row block ``pid_m``, column split ``pid_s``."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    y, valid, row_mask, m, w_y = _row_info(y_ptr, margin_ptr, weight_ptr, rows, N, C, ignore_index, margin_value,
                                           MARGIN_MODE, HAS_WEIGHT)
    col_lo = col_base + pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, col_end)
    m_i = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    sw = tl.zeros((BLOCK_M,), tl.float32)
    a_y, z_y = _target_logit(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, rows, row_mask, col_base, y, m,
                             col_lo, col_hi, tau, noise_mul, scale, seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE)
    if COLUMN_STATS:
        tl.store(zy_ptr + rows, z_y, mask=valid & (y >= col_lo) & (y < col_hi))
    if SINGLE_TILE:
        # the row is one tile: it stays in registers for a gradient in the same launch (no reload, and
        # GCL's noise is drawn once)
        z, a, cols, col_mask, mask = _adjusted_tile(
            z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, rows, row_mask, col_lo, col_base, y, m, col_hi, tau,
            noise_mul, scale, seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, True, ALIGN, BLOCK_M,
            BLOCK_N)
        m_i, l_i, sw, _ = _tile_stats(z, a, cols, col_mask, mask, y, valid, m_i, l_i, sw, weight_ptr, colstat_ptr,
                                      pid_m, num_row_blocks, C, HAS_WEIGHT, HAS_SMOOTH, COLUMN_STATS)
    else:
        full_end = _full_tiles_end(col_lo, col_hi, BLOCK_N)
        for col_start in range(col_lo, full_end, BLOCK_N):
            m_i, l_i, sw = _stats_step(
                z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, colstat_ptr, rows, row_mask, col_start,
                col_base, col_hi, y, m, valid, m_i, l_i, sw, pid_m, num_row_blocks, C, tau, noise_mul, scale, seed,
                noise_row0, grad_ptr, stride_gm, stride_gn, tile_max_ptr, (col_start - col_base) // BLOCK_N, num_tiles,
                HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, COLUMN_STATS, STORE_P, False,
                ALIGN, BLOCK_M, BLOCK_N)
        if full_end < col_hi:
            m_i, l_i, sw = _stats_step(
                z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, colstat_ptr, rows, row_mask, full_end,
                col_base, col_hi, y, m, valid, m_i, l_i, sw, pid_m, num_row_blocks, C, tau, noise_mul, scale, seed,
                noise_row0, grad_ptr, stride_gm, stride_gn, tile_max_ptr, (full_end - col_base) // BLOCK_N, num_tiles,
                HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, COLUMN_STATS, STORE_P, True,
                ALIGN, BLOCK_M, BLOCK_N)
    if SPLIT:
        offs = rows.to(tl.int64) * total_splits + (split_base + pid_s)
        plane = tl.cast(N, tl.int64) * total_splits
        tl.store(part_ptr + offs, m_i, mask=row_mask)
        tl.store(part_ptr + plane + offs, l_i, mask=row_mask)
        tl.store(part_ptr + 2 * plane + offs, a_y, mask=row_mask)
        tl.store(part_ptr + 3 * plane + offs, sw, mask=row_mask)
    else:
        log_sum = tl.log(l_i)
        factor = _finish_and_store_rows(m_i, log_sum, a_y, sw, w_y, valid, rows, row_mask, N, C, wsum_ptr,
                                        inv_denom_ptr, own_inv, loss_ptr, lse_ptr, factor_ptr, gamma, label_smoothing,
                                        HAS_WEIGHT, HAS_SMOOTH, HAS_FOCAL, MEAN, OWN_DENOM)
        if GRAD_IN_FWD:
            w_sum = _weight_sum(wsum_ptr, C, HAS_WEIGHT)
            inv_C = 1.0 / (C * 1.0)
            if SINGLE_TILE:  # the tile of the statistics pass, still in registers
                g = _grad_tile(a, z, m_i, log_sum, y, cols, col_mask, mask, factor, w_y, weight_ptr, w_sum, scale,
                               label_smoothing, inv_C, valid, w_y, loss_ptr, loss_ptr, 1.0,
                               HAS_WEIGHT, HAS_SMOOTH, False, True)
                _store_grad(grad_ptr, stride_gm, stride_gn, rows, cols, col_base, mask, g, ALIGN)
            else:
                _grad_columns(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, grad_ptr, stride_gm,
                              stride_gn, rows, row_mask, col_lo, col_base, col_hi, y, m, valid, m_i, log_sum, factor,
                              w_y, w_sum, inv_C, w_y, loss_ptr, loss_ptr, 1.0, tau, noise_mul, scale, label_smoothing,
                              seed, noise_row0, tile_max_ptr, num_tiles, HAS_PRIOR, HAS_NOISE, MARGIN_MODE,
                              HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, False, STORE_P, ALIGN, BLOCK_M, BLOCK_N)


# seed: a fresh random value every step; specialising on its divisibility by 16 would compile a second
# variant mid-training (1 step in 16), so it (and the chunk's first row) is a plain runtime argument
@triton.jit(do_not_specialize=["seed", "noise_row0"])
def row_loss_forward(
    z_ptr, stride_zm, stride_zn, y_ptr, prior_ptr, cloud_ptr, margin_ptr, weight_ptr, wsum_ptr, inv_denom_ptr,
    loss_ptr, lse_ptr, factor_ptr, part_ptr, colstat_ptr, zy_ptr, grad_ptr, stride_gm, stride_gn,
    tile_max_ptr, num_tiles, N, C, cols_per_split, col_base, col_end, split_base, total_splits, num_row_blocks,
    ignore_index, tau, noise_mul, margin_value, scale, gamma, label_smoothing, seed, noise_row0, seed_ptr,
    out_ptr, counter_ptr,
    HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, MEAN: tl.constexpr,
    SPLIT: tl.constexpr,
    SINGLE_TILE: tl.constexpr, GRAD_IN_FWD: tl.constexpr, COLUMN_STATS: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PERSISTENT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, OWN_DENOM: tl.constexpr, REDUCE: tl.constexpr,
    RBLOCK: tl.constexpr, STORE_P: tl.constexpr,
):
    """Grid (num_row_blocks = cdiv(N, BLOCK_M), num_splits), or fewer row programs when PERSISTENT. Online
    (max, sum-exp) over this program's columns.

    Program (i, s) covers global classes ``[col_base + s*cols_per_split, ...)``, capped at ``col_end`` (C, or
    the end of the class chunk); ``z`` (and the
    gradient) hold the classes from ``col_base`` on, so a caller may pass one class chunk of the logits.
    SPLIT: write partial (max, sumexp, a_y, sum w*a) to ``part_ptr`` (4, N, total_splits), slot
    ``split_base + s``, for ``row_loss_combine``; else write loss, lse and the backward factor per row
    (and the gradient over ``grad_ptr`` when GRAD_IN_FWD). COLUMN_STATS (LADE): per column, over this
    program's valid rows, write max z and sum exp(z - max) to ``colstat_ptr`` (2, num_row_blocks, C), and
    each valid row's raw target logit ``z_{i, y_i}`` to ``zy_ptr`` (N,) fp32 (by the one program whose columns
    hold the target; other rows are left unwritten).
    PERSISTENT: the grid has fewer row programs than the ``num_row_blocks`` row blocks and each program walks
    ``pid, pid + programs, ...``: fewer rows in flight, so that the gradient-in-forward's second pass over a long
    row (run from its end back, :func:`_grad_columns`) re-reads it from L2 rather than HBM.
    SEED_FROM_PTR: the noise seed is the int64 at ``seed_ptr`` (device memory: a CUDA graph replays the load, not
    a baked-in value), not ``seed``.
    MEAN: the factor includes ``1 / sum_i w_{y_i}``, read from ``inv_denom_ptr``, or with OWN_DENOM summed by every
    program itself from the targets (no launch before this one; cheap when programs x N is small).
    STORE_P (GRAD_IN_FWD over several tiles, or SPLIT for a gradient in the forward): the statistics pass stores
    each tile's ``exp(a - max)`` over the gradient buffer and the running max in ``tile_max_ptr`` ((N, num_tiles)
    fp32, tiles numbered from ``col_base`` across the splits); the gradient pass (here, or :func:`row_loss_grad`'s
    STORED after the combine of split rows) then scales those instead of recomputing the tile (no second read of z,
    class vectors or noise: GCL draws its noise once). The gradient is the same to one more rounding of ``p``
    (``exp(a - max)`` in the gradient's dtype).
    REDUCE (not SPLIT): the program that finishes last also writes the batch loss to ``out_ptr`` (0-dim):
    :func:`_last_program_reduces` (1: 'sum', 2: 'mean'; ``counter_ptr``: an int32 that is 0 before the launch and
    after it). RBLOCK: the width of the in-kernel batch sums.
    """
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    own_inv = _own_inverse(y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, MEAN and OWN_DENOM, RBLOCK)
    pid_s = tl.program_id(1)
    # two calls, not one loop whose trip count is 1 without PERSISTENT: that loop doubles the registers of the
    # one-row-block kernels (LA 131072 bf16 forward 39 -> 63, GCL 8142 fused 114 -> 255 with spills; kernel_report)
    if PERSISTENT:
        for pid_m in range(tl.program_id(0), num_row_blocks, tl.num_programs(0)):
            _forward_row_block(
                pid_m, pid_s, z_ptr, stride_zm, stride_zn, y_ptr, prior_ptr, cloud_ptr, margin_ptr, weight_ptr,
                wsum_ptr, inv_denom_ptr, own_inv, loss_ptr, lse_ptr, factor_ptr, part_ptr, colstat_ptr, zy_ptr,
                grad_ptr, stride_gm, stride_gn, tile_max_ptr, num_tiles, N, C, cols_per_split, col_base, col_end,
                split_base, total_splits, num_row_blocks, ignore_index, tau, noise_mul, margin_value, scale, gamma,
                label_smoothing, seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT,
                HAS_SMOOTH, HAS_FOCAL, MEAN, SPLIT, SINGLE_TILE, GRAD_IN_FWD, COLUMN_STATS, ALIGN, BLOCK_M, BLOCK_N,
                OWN_DENOM, STORE_P)
    else:
        _forward_row_block(
            tl.program_id(0), pid_s, z_ptr, stride_zm, stride_zn, y_ptr, prior_ptr, cloud_ptr, margin_ptr, weight_ptr,
            wsum_ptr, inv_denom_ptr, own_inv, loss_ptr, lse_ptr, factor_ptr, part_ptr, colstat_ptr, zy_ptr, grad_ptr,
            stride_gm, stride_gn, tile_max_ptr, num_tiles, N, C, cols_per_split, col_base, col_end, split_base,
            total_splits, num_row_blocks, ignore_index, tau, noise_mul, margin_value, scale, gamma, label_smoothing,
            seed, noise_row0, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH, HAS_FOCAL, MEAN,
            SPLIT, SINGLE_TILE, GRAD_IN_FWD, COLUMN_STATS, ALIGN, BLOCK_M, BLOCK_N, OWN_DENOM, STORE_P)
    if REDUCE != 0:
        _last_program_reduces(counter_ptr, out_ptr, loss_ptr, y_ptr, weight_ptr, factor_ptr, inv_denom_ptr, own_inv,
                              loss_ptr, 0, N, C, ignore_index, HAS_WEIGHT, MEAN, OWN_DENOM, REDUCE == 2, False, RBLOCK)


@triton.jit
def row_loss_combine(
    part_ptr, y_ptr, margin_ptr, weight_ptr, wsum_ptr, inv_denom_ptr, loss_ptr, lse_ptr, factor_ptr, out_ptr,
    counter_ptr, N, C, num_splits, ignore_index, gamma, label_smoothing,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_FOCAL: tl.constexpr, MEAN: tl.constexpr,
    OWN_DENOM: tl.constexpr, REDUCE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M),): merge the split partials of ``row_loss_forward`` into loss, lse, factor (MEAN,
    OWN_DENOM and REDUCE as there)."""
    own_inv = _own_inverse(y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, MEAN and OWN_DENOM, RBLOCK)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    y, valid, row_mask, m, w_y = _row_info(y_ptr, margin_ptr, weight_ptr, rows, N, C, ignore_index, 0.0, 0,
                                           HAS_WEIGHT)
    s = tl.arange(0, BLOCK_S)
    mask = row_mask[:, None] & (s[None, :] < num_splits)
    offs = rows.to(tl.int64)[:, None] * num_splits + s[None, :]
    plane = tl.cast(N, tl.int64) * num_splits
    p_max = tl.load(part_ptr + offs, mask=mask, other=NEG_BIG)
    p_sum = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
    a_y = tl.sum(tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0), 1)
    sw = tl.sum(tl.load(part_ptr + 3 * plane + offs, mask=mask, other=0.0), 1)
    m_row = tl.max(p_max, 1)
    log_sum = tl.log(tl.sum(p_sum * _exp(p_max - m_row[:, None]), 1))
    _finish_and_store_rows(m_row, log_sum, a_y, sw, w_y, valid, rows, row_mask, N, C, wsum_ptr, inv_denom_ptr,
                           own_inv, loss_ptr, lse_ptr, factor_ptr, gamma, label_smoothing, HAS_WEIGHT, HAS_SMOOTH,
                           HAS_FOCAL, MEAN, OWN_DENOM)
    if REDUCE != 0:
        _last_program_reduces(counter_ptr, out_ptr, loss_ptr, y_ptr, weight_ptr, factor_ptr, inv_denom_ptr, own_inv,
                              loss_ptr, 0, N, C, ignore_index, HAS_WEIGHT, MEAN, OWN_DENOM, REDUCE == 2, False, RBLOCK)


@triton.jit(do_not_specialize=["seed", "noise_row0"])  # as row_loss_forward
def row_loss_grad(
    z_ptr, stride_zm, stride_zn, y_ptr, prior_ptr, cloud_ptr, margin_ptr, weight_ptr, wsum_ptr,
    lse_ptr, factor_ptr, go_ptr, go_stride, col_a_ptr, col_b_ptr, col_lse_ptr, grad_ptr, stride_gm, stride_gn,
    N, C, cols_per_split, col_base, col_end, ignore_index, tau, noise_mul, margin_value, scale, label_smoothing, seed,
    noise_row0, seed_ptr, tile_max_ptr, num_tiles,
    HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, MARGIN_MODE: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_UPSTREAM: tl.constexpr, COLUMN_TERM: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SEED_FROM_PTR: tl.constexpr, STORED: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), num_splits): recompute the tile from the saved fp32 (row max, log sum-exp) and write
    ``upstream_i * factor_i * d loss_i / d z`` (plus LADE's column term, times the scalar upstream, when
    COLUMN_TERM); classes from ``col_base`` on, as in ``row_loss_forward`` (SEED_FROM_PTR too).
    STORED (the gradient in the forward of split rows): no recompute; ``grad_ptr`` holds what a split
    ``row_loss_forward`` with STORE_P left there (``exp(a - max)`` per tile, the running max at ``tile_max_ptr``
    (N, num_tiles)), which :func:`_grad_step` scales in place: z is not read and GCL's noise is not drawn again."""
    if SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    # the last programs of the forward (its last row blocks and splits, whose ends are the likeliest still in L2)
    # come first, and each row is walked from its end (:func:`_grad_columns`). The max(., 0) tells the compiler the
    # block index is not negative (without it the LADE gradient tile spills a register in its column loop).
    pid_m = tl.maximum(tl.num_programs(0) - 1 - tl.program_id(0), 0)
    pid_s = tl.num_programs(1) - 1 - tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    y, valid, row_mask, m, w_y = _row_info(y_ptr, margin_ptr, weight_ptr, rows, N, C, ignore_index, margin_value,
                                           MARGIN_MODE, HAS_WEIGHT)
    row_max = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    log_sum = tl.load(lse_ptr + N + rows, mask=row_mask, other=0.0)
    coef = tl.load(factor_ptr + rows, mask=row_mask, other=0.0)
    if HAS_UPSTREAM:
        coef = coef * tl.load(go_ptr + rows.to(tl.int64) * go_stride, mask=row_mask, other=0.0).to(tl.float32)
    w_sum = _weight_sum(wsum_ptr, C, HAS_WEIGHT)
    inv_C = 1.0 / (C * 1.0)
    col_lo = col_base + pid_s * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, col_end)
    col_a_y = w_y  # unused without COLUMN_TERM
    col_go = 1.0
    if COLUMN_TERM:  # LADE: its loss is reduced, so the upstream gradient is a scalar
        if HAS_UPSTREAM:
            col_go = tl.load(go_ptr).to(tl.float32)
        col_a_y = tl.load(col_a_ptr + y, mask=valid, other=0.0) * col_go
    _grad_columns(z_ptr, stride_zm, stride_zn, prior_ptr, cloud_ptr, weight_ptr, grad_ptr, stride_gm, stride_gn, rows,
                  row_mask, col_lo, col_base, col_hi, y, m, valid, row_max, log_sum, coef, w_y, w_sum, inv_C, col_a_y,
                  col_b_ptr, col_lse_ptr, col_go, tau, noise_mul, scale, label_smoothing, seed, noise_row0,
                  tile_max_ptr, num_tiles, HAS_PRIOR, HAS_NOISE, MARGIN_MODE, HAS_SCALE, HAS_WEIGHT, HAS_SMOOTH,
                  COLUMN_TERM, STORED, ALIGN, BLOCK_M, BLOCK_N)


@triton.jit
def _sum_of(ptr, n, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """fp32 sum of the ``n`` fp32 values at ``ptr``, in BLOCK-wide steps (a fixed order: deterministic). CACHE: the
    loads' cache modifier (".cg" reads at L2, for values other programs of the same launch wrote)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        acc += tl.load(ptr + start + offs, mask=start + offs < n, other=0.0, cache_modifier=CACHE)
    return tl.sum(acc, 0)


@triton.jit
def _batch_sums(loss_ptr, y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT: tl.constexpr, LOSS: tl.constexpr,
                DENOM: tl.constexpr, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """``(sum_i loss_i, sum_i w_{y_i})`` (fp32; the second over the valid rows, a target outside [0, C) counting 0;
    either is 0 when its flag is off) in one BLOCK-wide loop, so the loads of both are in flight together; a fixed
    order: deterministic. CACHE: the loss loads' cache modifier (as :func:`_sum_of`)."""
    offs = tl.arange(0, BLOCK)
    acc_loss = tl.zeros((BLOCK,), tl.float32)
    acc_w = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, N, BLOCK):
        rows = start + offs
        if LOSS:
            acc_loss += tl.load(loss_ptr + rows, mask=rows < N, other=0.0, cache_modifier=CACHE)
        if DENOM:
            y = tl.load(y_ptr + rows, mask=rows < N, other=ignore_index).to(tl.int64)
            valid = (rows < N) & (y != ignore_index)
            if HAS_WEIGHT:
                ok = valid & (y >= 0) & (y < C)
                acc_w += tl.load(weight_ptr + tl.where(ok, y, 0), mask=ok, other=0.0).to(tl.float32)
            else:
                acc_w += valid.to(tl.float32)
    return tl.sum(acc_loss, 0), tl.sum(acc_w, 0)


@triton.jit
def _inv_denominator(y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """``1 / sum_i w_{y_i}`` over the valid rows (fp32; inf for none; a target outside [0, C) counts 0)."""
    _, denom = _batch_sums(y_ptr, y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, False, True, BLOCK, "")
    return 1.0 / denom


@triton.jit
def _own_inverse(y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT: tl.constexpr, OWN: tl.constexpr,
                 BLOCK: tl.constexpr):
    """A row program's own ``1 / sum_i w_{y_i}`` when OWN (summed once, at its start), else a placeholder 1.0."""
    inv = 1.0
    if OWN:
        inv = _inv_denominator(y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, BLOCK)
    return inv


@triton.jit
def _mean_inverse(inv_denom_ptr, own_inv, OWN_DENOM: tl.constexpr):
    """The row kernels' ``1 / sum_i w_{y_i}``: their own (OWN_DENOM) or read where it is used (a load there keeps no
    register live across the column loops)."""
    if OWN_DENOM:
        inv = own_inv
    else:
        inv = tl.load(inv_denom_ptr)
    return inv


@triton.jit
def _scale_factors(ptr, inv, n, y_ptr, ignore_index, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """``factor_i *= inv`` (fp32, ``n`` rows) for the valid rows; an ignored row's factor stays 0 even when no row
    is valid (``inv = 1 / 0``), so its gradient is 0 rather than NaN (as torch's)."""
    offs = tl.arange(0, BLOCK)
    for start in range(0, n, BLOCK):
        mask = start + offs < n
        v = tl.load(ptr + start + offs, mask=mask, other=0.0, cache_modifier=CACHE)
        y = tl.load(y_ptr + start + offs, mask=mask, other=ignore_index)
        tl.store(ptr + start + offs, tl.where(y != ignore_index, v * inv, 0.0), mask=mask)


@triton.jit
def _last_program_reduces(counter_ptr, out_ptr, loss_ptr, y_ptr, weight_ptr, factor_ptr, inv_denom_ptr, own_inv,
                          extra_ptr, E, N, C, ignore_index, HAS_WEIGHT: tl.constexpr, HAVE_INV: tl.constexpr,
                          OWN_DENOM: tl.constexpr, MEAN_LOSS: tl.constexpr, EXTRA: tl.constexpr,
                          BLOCK: tl.constexpr):
    """The batch reduction in the launch that wrote the per-row losses, by its last program to finish.

    Each program, once its rows are stored, takes a ticket from ``counter_ptr`` (an int32, 0 at launch). The one
    that draws the last ticket sums every row in a fixed order (deterministic, whichever program it is) and writes
    ``out``: times ``1 / sum_i w_{y_i}`` when MEAN_LOSS, the rows' own when HAVE_INV (:func:`_mean_inverse`);
    without HAVE_INV it sums the denominator itself, in the same loop, and scales the factors by it too. EXTRA:
    plus the E fp32 values at ``extra_ptr`` that the programs wrote (LADE's LADER parts, one per program). Then it
    puts the counter back to 0 for the next launch on its stream.

    Ordering: the barrier makes this program's stores precede its ticket, the ticket is an acquire-release
    atomic at GPU scope (the others' stores precede the last ticket, which precedes the last program's loads),
    and those loads skip L1 (``.cg``); the pattern of Triton's layer-norm tutorial (stores, barrier, atomic)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) * tl.num_programs(1) - 1:
        # the denominator too when the rows did not have it ('mean', recompute mode): one loop for both sums
        total, denom = _batch_sums(loss_ptr, y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, True,
                                   MEAN_LOSS and not HAVE_INV, BLOCK, ".cg")
        if MEAN_LOSS:
            if HAVE_INV:
                total = total * _mean_inverse(inv_denom_ptr, own_inv, OWN_DENOM)
            else:
                batch_inv = 1.0 / denom
                _scale_factors(factor_ptr, batch_inv, N, y_ptr, ignore_index, BLOCK, ".cg")
                total = total * batch_inv
        if EXTRA:
            total += _sum_of(extra_ptr, E, BLOCK, ".cg")
        tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
        tl.store(counter_ptr, 0)


@triton.jit
def reduce_rows(loss_ptr, y_ptr, weight_ptr, factor_ptr, inv_denom_ptr, out_ptr, extra_ptr, N, C, E, ignore_index,
                HAS_WEIGHT: tl.constexpr, DENOM: tl.constexpr, LOSS: tl.constexpr, MEAN: tl.constexpr,
                SCALE_FACTOR: tl.constexpr, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (1,): the batch reductions in one deterministic program, no host sync.

    DENOM: ``inv = 1 / sum_i w_{y_i}`` over the valid rows (inf for none; a target outside [0, C) counts 0)
    stored to ``inv_denom`` (1,) fp32. LOSS: ``out = sum_i loss_i`` (times ``inv`` when MEAN; ``inv`` read back
    when not DENOM), plus ``sum_e extra_e`` (E fp32 values: LADE's LADER partials) when EXTRA, stored in ``out``'s
    dtype. SCALE_FACTOR: ``factor_i *= inv`` (a forward that left 'mean' to this launch)."""
    loss, denom = _batch_sums(loss_ptr, y_ptr, weight_ptr, N, C, ignore_index, HAS_WEIGHT, LOSS, DENOM, BLOCK, "")
    if DENOM:
        inv = 1.0 / denom
        tl.store(inv_denom_ptr, inv)
    elif MEAN:
        inv = tl.load(inv_denom_ptr)
    if LOSS:
        if MEAN:
            loss = loss * inv
        if EXTRA:
            loss += _sum_of(extra_ptr, E, BLOCK, "")
        tl.store(out_ptr, loss.to(out_ptr.dtype.element_ty))
    if SCALE_FACTOR:
        _scale_factors(factor_ptr, inv, N, y_ptr, ignore_index, BLOCK, "")


@triton.jit
def _scale_tiles(g_ptr, stride_m, stride_n, M, C, go_ptr, go_stride, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``g_ij *= go[i * go_stride]`` over the (M, C) tiles ``pid, pid + programs, ...`` of one tensor."""
    tiles_n = tl.cdiv(C, BLOCK_N)
    for t in range(tl.program_id(0), tl.cdiv(M, BLOCK_M) * tiles_n, tl.num_programs(0)):
        rows = (t // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (t % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < M
        go = tl.load(go_ptr + rows.to(tl.int64) * go_stride, mask=row_mask, other=0.0).to(tl.float32)
        mask = row_mask[:, None] & (cols[None, :] < C)
        offs = rows.to(tl.int64)[:, None] * stride_m + cols.to(tl.int64)[None, :] * stride_n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(g_ptr + offs, (g * go[:, None]).to(g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scale_rows(g0_ptr, s0m, s0n, M0, C0, g1_ptr, s1m, s1n, M1, C1, g2_ptr, s2m, s2n, M2, C2, go_ptr, go_stride,
               NUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Persistent grid: multiply ``NUM`` (1 to 3) stored gradients, each (M_k, C_k) with its own strides, in place by
    grad_output: ``g_ij *= go[i * go_stride]`` (per row: ``go_stride`` > 0, one tensor), or by the scalar go
    (``go_stride`` = 0), which when it is 1 (the usual ``loss.backward()``) returns at once, read on the device:
    no host sync, and a no-op costs the grid's few programs, not one per tile."""
    if go_stride == 0:
        if tl.load(go_ptr).to(tl.float32) == 1.0:
            return
    _scale_tiles(g0_ptr, s0m, s0n, M0, C0, go_ptr, go_stride, BLOCK_M, BLOCK_N)
    if NUM > 1:
        _scale_tiles(g1_ptr, s1m, s1n, M1, C1, go_ptr, go_stride, BLOCK_M, BLOCK_N)
    if NUM > 2:
        _scale_tiles(g2_ptr, s2m, s2n, M2, C2, go_ptr, go_stride, BLOCK_M, BLOCK_N)
