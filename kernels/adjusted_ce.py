"""The adjusted cross-entropy's row kernels (docs/design.md, "The operator" and "Kernels").

On (N, C) logits ``z`` (fp32/bf16/fp16, any strides) and int targets ``y``:
``a_ij = s * (z_ij + tau*log_prior_j - noise_mul*cloud_j*e_ij - m_i*[j == y_i])``,
``loss_i = focal_i * ((1 - eps) * w_{y_i} * (LSE_j a_ij - a_{i,y_i}) + eps/C * sum_j w_j (LSE_j a_ij - a_ij))``,
``focal_i = (1 - p_{i,y_i})^gamma`` (detached), 0 for ignored rows. Gradient w.r.t. ``z``:
``s * coef_i * ((1 - eps) * w_y * (p_ij - [j == y_i]) + eps/C * (W * p_ij - w_j))``, ``W = sum_j w_j``,
``coef_i = focal_i * upstream_i`` (``/ sum_i w_{y_i}`` for 'mean'). Statistics are fp32; the ``-1`` of the target
is folded in fp32 before the gradient is cast to the logits' dtype. Offsets are int64.

Kernels: ``row_loss_forward`` (one pass; a row may be split over several programs whose partial (max, sum-exp) are
merged by ``row_loss_combine``; optionally the gradient in the same launch, and LADE's per-column partial
statistics; the batch loss from the launch's last program, so a forward is one launch) and ``row_loss_grad``
(recompute backward, plus LADE's column term). Flags are constexpr (an off flag costs nothing); every float
hyperparameter is a runtime argument.

Call tree::

    row_loss_forward -- _forward_row_block --+-- _row_info, _target_logit
          |                                  +-- _adjusted_tile + _tile_stats (one tile), or _stats_step per tile
          |                                  +-- _finish_and_store_rows -- _finish_rows
          |                                  +-- _grad_tile (one tile), or _grad_columns -- _grad_step per tile
          +-- reduce.last_program_reduces
    row_loss_combine -- _row_info, _finish_and_store_rows, reduce.last_program_reduces
    row_loss_grad ----- _row_info, _grad_columns -- _grad_step -- _adjusted_tile, _grad_tile (or a stored tile)

The arguments travel in groups, NamedTuples the launchers (:mod:`fastlt.kernels.launch`) build: :class:`Operand`
(a matrix and its strides), :class:`ClassVectors` (the (C,) vectors), :class:`Hyper` (runtime scalars),
:class:`Flags` (constexpr switches), :class:`Columns` (the launch's classes), :class:`RowOutputs`, and the
optional outputs of some modes. Inside a program: :class:`Row` (a block of rows), :class:`Tile`, :class:`Rng`,
:class:`RowGrad`, :class:`ColumnGrad`.
"""

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .numerics import LOG2E, NEG_BIG, exp, one_minus_exp_neg
from .philox_noise import gcl_noise_at, gcl_noise_tile, load_noise_table
from .reduce import Targets, last_program_reduces, mean_inverse, own_inverse, publish_inverse

# --- argument groups, built by the launchers -------------------------------------------------------------------------


class Operand(NamedTuple):
    """An (N, C) matrix: its pointer and strides (elements)."""

    ptr: Any
    stride_m: Any
    stride_n: Any


class ClassVectors(NamedTuple):
    """The operator's (C,) fp32 vectors (None where its flag is off): ``log_prior`` (times tau), ``cloud`` (times
    noise_mul), per-class target ``margin`` (MARGIN_MODE 2), class ``weight``."""

    log_prior: Any
    cloud: Any
    margin: Any
    weight: Any


class Hyper(NamedTuple):
    """The operator's runtime scalars (never constexpr: users schedule them). A kernel that never reads one is passed
    None there (no parameter)."""

    ignore_index: Any
    tau: Any
    noise_mul: Any
    margin_value: Any  # MARGIN_MODE 1: the margin of every row
    scale: Any
    gamma: Any
    label_smoothing: Any


class Flags(NamedTuple):
    """Which terms of the operator are on (one constexpr: an off term costs nothing). MARGIN_MODE: 0 none, 1 one
    value for every row, 2 per class. NOISE_MODE: 0 no GCL noise, 1 noise_mul = 1 (the cloud vector is the noise's
    spread: no multiply per column), 2 any other noise_mul. SCALE_MODE: 0 none (s = 1), 1 a positive s (the tiles'
    max is taken before the scale: :class:`Tile`), 2 any other s. SEED_FROM_PTR: the noise seed is the int64 at
    ``seed_ptr`` (a CUDA graph replays the load, not a baked-in value). SOFT: the targets are class probabilities
    (:class:`Soft`)."""

    HAS_LOG_PRIOR: bool = False
    NOISE_MODE: int = 0
    MARGIN_MODE: int = 0
    SCALE_MODE: int = 0
    HAS_WEIGHT: bool = False
    HAS_SMOOTH: bool = False
    HAS_FOCAL: bool = False
    SEED_FROM_PTR: bool = False
    SOFT: bool = False  # class-probability targets (:class:`Soft`)
    NOISE_SHIFT: int = 0  # the columns start this far past a multiple of 8 (an unaligned class shard): its tiles draw
    # two Philox calls per 8 columns (:func:`fastlt.kernels.philox_noise.gcl_noise_tile`'s SHIFT)


class Columns(NamedTuple):
    """The classes of a launch: program (i, s) covers ``[base + s * per_split, ...)`` capped at ``end`` (C, or the end
    of a class chunk); the operands hold the classes from ``base`` on (0 unless the caller passes a class chunk).
    Split rows (SPLIT) write their partials (5, N, ``num_splits``) fp32 (max, sum-exp, a_y, sum w*(a - max), sum w;
    6 planes for class probabilities) to slot
    ``first_split + s`` (None where no partials are written)."""

    per_split: Any
    base: Any
    end: Any
    first_split: Any = None
    num_splits: Any = None


class RowOutputs(NamedTuple):
    """What the forward leaves per row, fp32: ``loss`` (N,), ``stats`` (2, N) = (row max, log sum-exp) of the
    adjusted row (the LSE is their sum), ``coef`` (N,) = the backward's coefficient (focal factor, 'mean''s
    1 / sum_i w_{y_i})."""

    loss: Any
    stats: Any
    coef: Any


class ColumnStats(NamedTuple):
    """LADE's per-column statistics as the row kernel leaves them: ``partials`` (2, R, C) fp32, per block of rows
    the column max of z and sum exp(z - max) over its valid rows; ``target_logits`` (N,) fp32, each valid row's
    ``z_{i, y_i}`` (rows that are ignored or whose target is out of range are left unwritten). The per-class
    target sums and counts are folded from these by :func:`fastlt.kernels.lade.finish`."""

    partials: Any
    target_logits: Any


class StoredTiles(NamedTuple):
    """STORE_P: the running max of each tile, ``maxima`` (N, count) fp32 (tiles numbered from ``Columns.base``
    across the splits of a row), beside the tiles' ``exp(a - max)`` in the gradient buffer."""

    maxima: Any
    count: Any


class ColumnTerm(NamedTuple):
    """LADE's gradient term: ``columns``, a contiguous (3, C) fp32 tensor of rows ``a``, ``b`` (both times alpha) and
    ``lse`` (one pointer: no views to make per step), for ``a_c [y_i == c] + b_c exp(z_ic - lse_c)`` on valid rows,
    times the scalar upstream gradient."""

    columns: Any


class Soft(NamedTuple):
    """Class-probability targets (SOFT; None otherwise, no parameter): the (N, C) targets ``q`` and their strides
    (classes from the same base as z; flat, not a nested :class:`Operand`, which triton 3.6 mis-specialises), and
    ``row_scale`` a runtime float multiplying every row's loss and coefficient ('mean' over probabilities divides
    by N: the launchers run it as 'sum' with ``1 / N`` here).
    For a row, with label smoothing folded into the targets, ``q'_ij = (1 - eps) q_ij + eps / C``:
    ``W_q = sum_j w_j q'_ij``, ``A_q = sum_j w_j q'_ij (a_ij - max)`` (relative to the running max, moved with it
    as label smoothing's sum of class-index rows: a large common offset of the logits loses no precision) and, for
    the focal factor, ``p_t = sum_j q_ij p_ij``; the loss ``W_q log sum-exp - A_q`` (= ``sum_j w_j q'_ij (LSE -
    a_ij)``) and the gradient ``W_q p_ij - w_j q'_ij``; the margin is ``m_j q_ij``."""

    q: Any
    stride_m: Any
    stride_n: Any
    row_scale: Any


# --- inside a program ---------------------------------------------------------------------------------------------


class Row(NamedTuple):
    """A block of rows: ``idx`` (BLOCK_M,) indices, ``mask`` (< N), target ``y`` (0 when ignored or out of range),
    ``valid`` (not ignored), ``margin`` m_i and ``w_y`` the target's class weight (NaN for a target out of range),
    both fp32."""

    idx: Any
    mask: Any
    y: Any
    valid: Any
    margin: Any
    w_y: Any


class Tile(NamedTuple):
    """A (BLOCK_M, BLOCK_N) tile: ``z`` fp32, ``a`` the adjusted logits (fp32, -inf outside the matrix), global class
    indices ``cols``, ``col_mask``, the 2-D ``mask``, ``q`` the class-probability targets (fp32, 0 outside;
    without SOFT a placeholder, never read), and ``top`` what the tile's max is taken of (:func:`_tile_max`): with a
    positive scale s (SCALE_MODE 1) the adjusted logits before it, since ``max_j fl(s a_j) = fl(s max_j a_j)`` for
    s > 0 (rounding is monotone), which saves the statistics loop a multiply per element (the one in ``a`` then
    joins the exponent's subtraction in an FMA); else ``a`` itself."""

    z: Any
    a: Any
    cols: Any
    col_mask: Any
    mask: Any
    q: Any
    top: Any


class Rng(NamedTuple):
    """GCL's noise: element (i, j) is a function of (``seed``, ``row0 + i``, j); ``table`` the levels held by the
    program (:func:`fastlt.kernels.philox_noise.load_noise_table`; 0.0 where no tile draws noise), ``table_ptr``
    where they lie (a target's one-element draw reads it there)."""

    seed: Any
    row0: Any
    table: Any
    table_ptr: Any


@triton.jit
def _noise_rng(seed, noise_row0, seed_ptr, noise_table, F: tl.constexpr):
    """The :class:`Rng` of a launch: the seed (read from ``seed_ptr`` when SEED_FROM_PTR), and the table of levels
    loaded once for the whole program when its tiles draw noise."""
    if F.SEED_FROM_PTR:
        seed = tl.load(seed_ptr)
    table = 0.0
    if F.NOISE_MODE != 0:
        table = load_noise_table(noise_table)
    return Rng(seed, noise_row0, table, noise_table)


class RowGrad(NamedTuple):
    """What a gradient pass needs per row: the saved (``row_max``, ``log_sum``), the coefficient ``coef`` (times the
    upstream gradient), ``w_sum`` = W, ``inv_C`` = 1 / C, and ``w_q`` = W_q (SOFT: saved as ``stats[2]``; else
    0.0, never read: triton 3.6 cannot build a tuple holding None, where 3.9 can)."""

    row_max: Any
    log_sum: Any
    coef: Any
    w_sum: Any
    inv_C: Any
    w_q: Any = 0.0


@triton.jit
def _row_grad(row_max, log_sum, coef, row, wsum_ptr, C, w_q, F: tl.constexpr):
    """The :class:`RowGrad` of a block of rows from their statistics; an ignored row gets ``row_max`` = +inf and
    ``log_sum`` = 0, so that its probabilities are exactly 0 whatever its logits: a row masked whole with -inf (or
    with ``finfo.min`` under a scale s > 1, which overflows to -inf) has ``log_sum`` = -inf, and 0 * NaN would
    write NaN over a row that torch ignores (F.cross_entropy itself gives NaN there; the float64 reference 0)."""
    row_max = tl.where(row.valid, row_max, float("inf"))
    log_sum = tl.where(row.valid, log_sum, 0.0)
    return RowGrad(row_max, log_sum, coef, _weight_sum(wsum_ptr, C, F), 1.0 / (C * 1.0), w_q)


class ColumnGrad(NamedTuple):
    """LADE's column term in a gradient pass: ``a_y`` (BLOCK_M,) the target class's ``a`` (times ``go``), the
    pointers ``b`` and ``lse``, ``go`` the scalar upstream gradient, and (SOFT) the pointer ``a``, read per class
    and weighed by the targets' tile."""

    a_y: Any
    b: Any
    lse: Any
    go: Any
    a: Any = None


# --- the operator on a tile ---------------------------------------------------------------------------------------

@triton.jit
def _row_info(y_ptr, vecs, hp, idx, N, C, F: tl.constexpr):
    """The :class:`Row` of indices ``idx``: targets clamped to 0 when ignored, validity, margin and class weight.
    SOFT: no index is read; every row in range is valid, ``y`` 0, and ``w_y`` 1 until the forward replaces it by
    ``W_q`` (the per-element terms read the targets' tiles)."""
    row_mask = idx < N
    if F.SOFT:
        row = Row(idx, row_mask, tl.zeros(idx.shape, tl.int64), row_mask, tl.zeros(idx.shape, tl.float32),
                  tl.full(idx.shape, 1.0, tl.float32))
    else:
        y = tl.load(y_ptr + idx, mask=row_mask, other=hp.ignore_index).to(tl.int64)
        valid = row_mask & (y != hp.ignore_index)
        in_range = (y >= 0) & (y < C)
        y = tl.where(valid & in_range, y, 0)
        if F.MARGIN_MODE == 2:
            m = tl.load(vecs.margin + y, mask=valid, other=0.0).to(tl.float32)
        elif F.MARGIN_MODE == 1:
            m = tl.zeros(idx.shape, tl.float32) + hp.margin_value
        else:
            m = tl.zeros(idx.shape, tl.float32)
        if F.HAS_WEIGHT:
            w_y = tl.load(vecs.weight + y, mask=valid, other=0.0).to(tl.float32)
        else:
            w_y = tl.full(idx.shape, 1.0, tl.float32)
        # a target outside [0, C) is never loaded through: its row's loss and gradient become NaN (the GPU
        # path cannot raise without a host sync; the CPU path raises ValueError before launching)
        w_y = tl.where(valid & ~in_range, float("nan"), w_y)
        row = Row(idx, row_mask, y, valid, m, w_y)
    return row


@triton.jit
def _row_offsets(rows, stride, ALIGN: tl.constexpr):
    """int64 ``rows * stride``, declared a multiple of ALIGN (the launcher checks the stride) so that rows of an odd
    width (C = 8142) still load and store in 2- or 4-element vectors."""
    offs = rows.to(tl.int64) * stride
    if ALIGN > 1:
        offs = tl.multiple_of(offs, ALIGN)
    return offs


@triton.jit
def _tile_ptrs(x, rows, col_start, col_base, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr, ROW_PTRS: tl.constexpr):
    """Pointers to a tile (rows x BLOCK_N columns from ``col_start``; classes from ``col_base`` on) of the
    :class:`Operand` ``x``. ROW_PTRS: a pointer per row plus the column offsets ``arange * stride``, which take fewer
    instructions than an int64 offset an element (LA 4096 x 8142 bf16 whole row with the gradient in the forward:
    53.3 -> 52.4 SASS an element; triton 3.6 53.9 -> 51.9, 86 -> 64 registers; LA 8142 fp32 gradient loop 15.8 ->
    13.1). Whole-row tiles and the gradient loops take them. The statistics loops and LADE's gradient do not: there
    the column offsets, the same in every tile, stayed live in registers (GCL 4096 x 131072 bf16 fused 92 -> 158
    registers, LADE's gradient 96 -> 126, the all-terms fp32 tile spilled in its loop)."""
    if ROW_PTRS:
        row_ptrs = x.ptr + (_row_offsets(rows, x.stride_m, ALIGN) + (col_start - col_base).to(tl.int64) * x.stride_n)
        ptrs = row_ptrs[:, None] + (tl.arange(0, BLOCK_N).to(tl.int64) * x.stride_n)[None, :]
    else:
        ptrs = x.ptr + (_row_offsets(rows, x.stride_m, ALIGN)[:, None]
                        + (col_start + tl.arange(0, BLOCK_N) - col_base).to(tl.int64)[None, :] * x.stride_n)
    return ptrs


@triton.jit
def _load_tile(x, row, col_start, col_base, col_hi, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr,
               BLOCK_N: tl.constexpr, ROW_PTRS: tl.constexpr = False):
    """``(x fp32, cols, col_mask, mask)``: the (rows, BLOCK_N) tile of the :class:`Operand` ``x`` holding classes from
    ``col_base`` on, columns from ``col_start``, masked at ``col_hi`` only when MASK_COLS (see
    :func:`_adjusted_tile`); ROW_PTRS: :func:`_tile_ptrs`'."""
    cols = col_start + tl.arange(0, BLOCK_N)
    if MASK_COLS:
        col_mask = cols < col_hi
    else:
        col_mask = tl.full((BLOCK_N,), True, tl.int1)
    mask = row.mask[:, None] & col_mask[None, :]
    v = tl.load(_tile_ptrs(x, row.idx, col_start, col_base, ALIGN, BLOCK_N, ROW_PTRS), mask=mask, other=0.0)
    return v.to(tl.float32), cols, col_mask, mask


@triton.jit
def _is_target(cols, row, WIDE: tl.constexpr = False):
    """(BLOCK_M, BLOCK_N) ``cols == y_i``, compared in int32: ``row.y`` is int64 for its address arithmetic but lies
    in [0, C), so the per-element compare needs no sign extension of the columns and no 64-bit compare (2 instructions
    an element fewer where a tile holds a target). WIDE: compared in int64 (see :func:`_adjusted_tile`'s MARGIN)."""
    if WIDE:
        return cols[None, :] == row.y[:, None]
    else:
        return cols[None, :] == row.y.to(tl.int32)[:, None]


@triton.jit
def _noise_spread(vecs, hp, classes, mask, F: tl.constexpr):
    """GCL's noise spread ``noise_mul * cloud_j`` at the class indices ``classes`` (fp32, 0 where not ``mask``);
    NOISE_MODE 1 (noise_mul = 1, which multiplies exactly): the cloud itself, no multiply."""
    spread = tl.load(vecs.cloud + classes, mask=mask, other=0.0).to(tl.float32)
    if F.NOISE_MODE == 2:
        spread = hp.noise_mul * spread
    return spread


@triton.jit
def _holds_target(y, col_start, BLOCK_N: tl.constexpr):
    """Whether a target of the tile's rows lies in its columns ``[col_start, col_start + BLOCK_N)``, a scalar: only
    such a tile (one per row) needs the per-element compare with the target (margin, one-hot), which otherwise
    costs ~3 instructions per element in every tile."""
    return tl.sum(((y >= col_start) & (y < col_start + BLOCK_N)).to(tl.int32), 0) > 0


@triton.jit
def _adjusted_tile(z_op, vecs, hp, rng, row, col_start, col_base, col_hi, soft, F: tl.constexpr, MARGIN: tl.constexpr,
                   MASK_COLS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   FINISH: tl.constexpr, ONE_TILE: tl.constexpr = False, ROW_PTRS: tl.constexpr = False):
    """Load a tile of z and return its :class:`Tile`. ``cols`` are global class indices, masked at ``col_hi`` (the end
    of this program's columns) when MASK_COLS; a tile that lies wholly inside them passes MASK_COLS=False, so the
    (C,) vectors load unmasked and the loads of z are masked per row only (both vectorise at any C). z holds the
    classes from ``col_base`` on; ALIGN: a power of two dividing its row stride (lets odd-C rows vectorise).
    MARGIN: apply the target margin (when the tile holds a target); off where the tile is known to hold none.
    SOFT: the targets' tile is loaded too (:class:`Soft`), and the margin is ``m_j q_ij``. ONE_TILE: the row's only
    tile (no column loop): the margin's compare in int32, shared with the gradient's one-hot. ROW_PTRS:
    :func:`_tile_ptrs`'."""
    z, cols, col_mask, mask = _load_tile(z_op, row, col_start, col_base, col_hi, MASK_COLS, ALIGN, BLOCK_N, ROW_PTRS)
    q = z  # without SOFT, a placeholder never read (triton 3.6 cannot return a tuple holding None)
    if F.SOFT:
        q = _load_tile(Operand(soft.q, soft.stride_m, soft.stride_n), row, col_start, col_base, col_hi, MASK_COLS,
                       ALIGN, BLOCK_N, ROW_PTRS)[0]
    a = z
    if F.HAS_LOG_PRIOR:
        a += hp.tau * tl.load(vecs.log_prior + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if F.NOISE_MODE != 0:
        spread = _noise_spread(vecs, hp, cols, col_mask, F)[None, :]
        # 16-bit logits take the Philox products in wide multiplies (fewer instructions: their budget an element is
        # half fp32's); fp32 tiles hold twice the registers and keep the register-pair-free form (philox4x32)
        a -= spread * gcl_noise_tile(rng.seed, rng.table, row.idx + rng.row0, col_start, BLOCK_M, BLOCK_N,
                                     F.NOISE_SHIFT, z_op.ptr.dtype.element_ty.primitive_bitwidth < 32)
    if F.SOFT:
        if F.MARGIN_MODE == 2:
            a -= tl.load(vecs.margin + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :] * q
        elif F.MARGIN_MODE == 1:
            a -= hp.margin_value * q
    elif MARGIN:
        if _holds_target(row.y, col_start, BLOCK_N):
            # the statistics pass's margin compares in int64 (WIDE), which keeps this branch (the margin alone) a
            # branch: with the cheaper int32 compare triton 3.9's ptxas predicates it into every tile (GCL 4096 x
            # 131072 bf16: 427 -> 483 SASS per 16 elements a thread; with a device seed 493 -> 564). Branching
            # around the whole finish and statistics instead (two versions, as _grad_step does) kept the tiles
            # without a target at 428 but made both tritons duplicate loop bodies where a program holds two rows
            # with STORE_P (72 -> 124 registers). The gradient pass's versions are large: it compares in int32. A
            # whole-row tile has no loop to keep the branch out of, and its gradient's one-hot takes the same int32
            # compare (GCL 4096 x 8142 bf16 with the gradient in the forward: 74.0 -> 72.1 an element)
            a -= tl.where(_is_target(cols, row, not ONE_TILE), row.margin[:, None], 0.0)
    t = Tile(z, a, cols, col_mask, mask, q, a)
    if FINISH:
        t = _finish_tile(t, row, hp, F, False, MASK_COLS)
    return t


@triton.jit
def _finish_tile(t, row, hp, F: tl.constexpr, TARGET_MARGIN: tl.constexpr, MASK: tl.constexpr):
    """The end of :func:`_adjusted_tile`: the target's margin (TARGET_MARGIN: the gradient pass's tile that holds the
    target, which loaded its tile unfinished so that the loads stay above the branch), then the scale, then -inf
    outside the matrix (MASK: a tile that reaches past its row's last column). Rows past N are not masked: their
    elements load as 0 (finite statistics, never stored: every per-row store and the batch sums go by the row mask
    or validity), which saves a select per element in every tile of a multi-row block (~17% of LA's bf16
    statistics loop). The statistics pass's order, so the same rounding."""
    a = t.a
    if TARGET_MARGIN:
        a -= tl.where(_is_target(t.cols, row), row.margin[:, None], 0.0)
    if F.SCALE_MODE == 1:  # s > 0: -inf * s = -inf, so the mask may come first; the max of the unscaled values
        if MASK:
            a = tl.where(t.mask, a, float("-inf"))
        return Tile(t.z, a * hp.scale, t.cols, t.col_mask, t.mask, t.q, a)
    if F.SCALE_MODE != 0:
        a = a * hp.scale
    if MASK:
        a = tl.where(t.mask, a, float("-inf"))
    return Tile(t.z, a, t.cols, t.col_mask, t.mask, t.q, a)


@triton.jit
def _tile_max(top, hp, F: tl.constexpr, AXIS: tl.constexpr):
    """The max of a tile's adjusted logits along AXIS from its ``top`` (:class:`Tile`): times the scale where ``top``
    is the unscaled one (SCALE_MODE 1)."""
    m = tl.max(top, AXIS)
    if F.SCALE_MODE == 1:
        m = m * hp.scale
    return m


@triton.jit
def _target_logit(z_op, vecs, hp, rng, row, col_base, col_lo, col_hi, F: tl.constexpr):
    """``(a_{i, y_i}, z_{i, y_i})`` (fp32) for the rows whose target lies in ``[col_lo, col_hi)``, 0 elsewhere:
    one gathered element per row, the same arithmetic as :func:`_adjusted_tile` (so no per-element
    compare-and-sum), and the raw logit (LADE's class sums)."""
    here = row.mask & (row.y >= col_lo) & (row.y < col_hi)
    offs = row.idx.to(tl.int64) * z_op.stride_m + (row.y - col_base) * z_op.stride_n
    z = tl.load(z_op.ptr + offs, mask=here, other=0.0).to(tl.float32)
    a = z
    if F.HAS_LOG_PRIOR:
        a += hp.tau * tl.load(vecs.log_prior + row.y, mask=here, other=0.0).to(tl.float32)
    if F.NOISE_MODE != 0:
        a -= _noise_spread(vecs, hp, row.y, here, F) * gcl_noise_at(rng.seed, rng.table_ptr, row.idx + rng.row0, row.y)
    if F.MARGIN_MODE != 0:
        a -= row.margin
    return tl.where(here, a * hp.scale, 0.0), z


@triton.jit
def _weight_sum(wsum_ptr, C, F: tl.constexpr):
    """W = sum_j w_j (precomputed on the device; only label smoothing reads it), or C without weights."""
    if F.HAS_WEIGHT and F.HAS_SMOOTH:
        w_sum = tl.load(wsum_ptr)
    else:
        w_sum = C * 1.0
    return w_sum


@triton.jit
def _finish_rows(row_max, log_sum, a_y, sw, row, w_sum, hp, inv_C, soft, p_t, F: tl.constexpr):
    """Per-row loss (0 when ignored) and focal factor (0 when ignored) from the row statistics. ``sw``: label
    smoothing's ``sum_j w_j (a_j - row_max)`` and ``w_sum`` its ``sum_j w_j``, so that its term
    ``W LSE - sum_j w_j a_j`` is ``w_sum * log_sum - sw``: no cancellation of two sums at the logits' magnitude
    (a large common offset keeps its precision, a row masked whole with ``finfo.min`` stays finite). SOFT: ``a_y``
    is ``A_q`` (relative to ``row_max``, label smoothing folded in), ``row.w_y`` is ``W_q`` and ``p_t`` the target
    probability ``sum_j q_ij p_ij`` (:class:`Soft`); both results are multiplied by ``soft.row_scale``. The focal
    base ``1 - p_y = 1 - exp(-ce)`` comes from :func:`one_minus_exp_neg` (accurate for a confident row's small
    ``ce``)."""
    if F.SOFT:
        loss = row.w_y * log_sum - a_y  # W_q LSE - sum_j w_j q'_j a_j, both relative to the max
    else:
        ce = (row_max - a_y) + log_sum  # LSE - a_y without rounding LSE at the logits' magnitude
        loss = (1.0 - hp.label_smoothing) * row.w_y * ce
        if F.HAS_SMOOTH:
            loss += hp.label_smoothing * inv_C * (w_sum * log_sum - sw)
    focal = tl.full(row_max.shape, 1.0, tl.float32)
    if F.HAS_FOCAL:
        if F.SOFT:
            base = tl.maximum(1.0 - p_t, 0.0)
        else:
            base = tl.maximum(one_minus_exp_neg(ce), 0.0)
        focal = tl.where(base > 0.0, tl.exp2(hp.gamma * tl.log2(base)), 0.0)
        loss = loss * focal
    if F.SOFT:
        loss = loss * soft.row_scale
        focal = focal * soft.row_scale
    return tl.where(row.valid, loss, 0.0), tl.where(row.valid, focal, 0.0)


@triton.jit
def _finish_and_store_rows(row_max, log_sum, a_y, sw, w_seen, row, N, C, inv_denom_ptr, own_inv, out, hp, soft, p_t,
                           F: tl.constexpr, MEAN: tl.constexpr, DENOM: tl.constexpr):
    """Finish the rows (:func:`_finish_rows`; the coefficient times 1 / sum w_{y_i} when MEAN:
    :func:`fastlt.kernels.reduce.mean_inverse`) and store them in the :class:`RowOutputs` ``out`` (SOFT: ``W_q`` as
    ``stats[2]``). Returns the coefficient, for a gradient in the same launch. Label smoothing's ``sw``:
    ``sum_j w_j (a_j - row_max)`` over the columns whose weights sum to ``w_seen`` (the whole row: a program that
    saw it, or the combine of its splits); SOFT: folded into the targets (``a_y``), neither is read."""
    loss, coef = _finish_rows(row_max, log_sum, a_y, sw, row, w_seen, hp, 1.0 / (C * 1.0), soft, p_t, F)
    if F.SOFT:
        tl.store(out.stats + 2 * N + row.idx, row.w_y, mask=row.mask)
    if MEAN:  # an ignored row stays 0 when no row is valid (1 / sum w = inf): zero gradients, as torch gives
        coef = tl.where(row.valid, coef * mean_inverse(inv_denom_ptr, own_inv, DENOM), 0.0)
    tl.store(out.loss + row.idx, loss, mask=row.mask)
    tl.store(out.stats + row.idx, row_max, mask=row.mask)
    tl.store(out.stats + N + row.idx, log_sum, mask=row.mask)
    tl.store(out.coef + row.idx, coef, mask=row.mask)
    return coef


@triton.jit
def _grad_tile(tile, row, rg, vecs, hp, colg, F: tl.constexpr, COLUMN_TERM: tl.constexpr, TARGET: tl.constexpr):
    """d loss / d z for one :class:`Tile`, fp32 (the target's -1 folded here, before any downcast), from the row's
    :class:`RowGrad` ``rg``. COLUMN_TERM (LADE): plus ``colg.a_y * [j == y_i] + colg.go * b_j * exp(z_ij - lse_j)``
    on valid rows (:class:`ColumnGrad`). TARGET: the tile may hold a target (:func:`_holds_target`); without it the
    one-hot terms are left out."""
    # a - max is exact for the large entries; the log sum-exp (at most log C: no offset's magnitude) enters the base-2
    # exponent through one FMA, (a - max) log2(e) - log_sum log2(e), instead of a subtraction and a multiply
    p = tl.math.exp2((tile.a - rg.row_max[:, None]) * LOG2E - (rg.log_sum * LOG2E)[:, None])
    return _grad_from_p(p, tile.z, tile.q, tile.cols, tile.col_mask, row, rg, vecs, hp, colg, F, COLUMN_TERM, TARGET)


@triton.jit
def _grad_from_p(p, z, q, cols, col_mask, row, rg, vecs, hp, colg, F: tl.constexpr, COLUMN_TERM: tl.constexpr,
                 TARGET: tl.constexpr):
    """:func:`_grad_tile` from the tile's probabilities ``p`` (fp32); SOFT: ``q`` the targets' tile (fp32). The
    per-row factors (``1 - eps``, ``w_y``, the coefficient, the scale; smoothing's ``eps / C``) are multiplied per
    row first, so an element takes one multiply for them, not two."""
    r = rg.coef * hp.scale  # per row
    if F.SOFT:  # W_q p - w q' (label smoothing folded into the targets: Soft)
        g = (rg.w_q[:, None] * p - _smoothed_targets(q, cols, col_mask, vecs, hp, rg.inv_C, F)) * r[:, None]
    else:
        d = p
        if TARGET:
            d = p - _is_target(cols, row).to(tl.float32)
        g = d * ((1.0 - hp.label_smoothing) * row.w_y * r)[:, None]
    if F.HAS_SMOOTH and not F.SOFT:
        if F.HAS_WEIGHT:
            w_j = tl.load(vecs.weight + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            w_j = 1.0
        g += (rg.w_sum * p - w_j) * (hp.label_smoothing * rg.inv_C * r)[:, None]
    if COLUMN_TERM:
        col_b = tl.load(colg.b + cols, mask=col_mask, other=0.0) * colg.go
        col_lse = tl.load(colg.lse + cols, mask=col_mask, other=0.0)
        e_col = exp(z - col_lse[None, :])  # before col_b: this order keeps LADE's bf16 gradient at 72 registers
        t = col_b[None, :] * e_col
        if F.SOFT:  # LADE's class sums weigh the rows by q: a_j q_ij
            t += tl.load(colg.a + cols, mask=col_mask, other=0.0)[None, :] * colg.go * q
        elif TARGET:
            t += tl.where(_is_target(cols, row), colg.a_y[:, None], 0.0)
        g += tl.where(row.valid[:, None], t, 0.0)
    return g


@triton.jit
def _store_tile(g_op, row, col_start, col_base, mask, g, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
                ROW_PTRS: tl.constexpr = False):
    """Store the fp32 tile ``g`` (its columns from ``col_start``) into the :class:`Operand` ``g_op`` in its dtype;
    ROW_PTRS: :func:`_tile_ptrs`'."""
    tl.store(_tile_ptrs(g_op, row.idx, col_start, col_base, ALIGN, BLOCK_N, ROW_PTRS),
             g.to(g_op.ptr.dtype.element_ty), mask=mask)


@triton.jit
def _smoothing_shift(w_seen, m_old, m_new):
    """What label smoothing's running sum ``sum_j w_j (a_j - m_old)`` over the weights ``w_seen`` gains when its
    reference max moves from ``m_old`` to ``m_new``: ``w_seen * (m_old - m_new)``, 0 where no weight was seen (its
    ``m_old`` may still be the start value, -3.4e38)."""
    return tl.where(w_seen > 0.0, w_seen * (m_old - m_new), 0.0)


@triton.jit
def _smoothed_targets(q, cols, col_mask, vecs, hp, inv_C, F: tl.constexpr):
    """SOFT: ``w_j q'_ij`` of a tile's targets ``q`` (fp32), ``q' = (1 - eps) q + eps inv_C`` with label smoothing
    (:class:`Soft`), ``w_j`` the class weights (0 past ``col_mask``; 1 without weights: mask the result)."""
    if F.HAS_SMOOTH:
        q = q * (1.0 - hp.label_smoothing) + hp.label_smoothing * inv_C
    if F.HAS_WEIGHT:
        q = tl.load(vecs.weight + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :] * q
    return q


@triton.jit
def _tile_stats(tile, row, m_i, l_i, sw, qa, qw, qp, vecs, hp, colstats, pid_m, num_row_blocks, C, F: tl.constexpr,
                COLUMN_STATS: tl.constexpr):
    """Fold one :class:`Tile` into the running row statistics (max, sum-exp, smoothing sum) and, for LADE, store its
    column partials (max z, sum exp(z - max) over the valid rows) in the :class:`ColumnStats` ``colstats``. LADE's
    class sums and counts come from the gathered target logits instead (one element per row, not a compare per
    element). Returns the new (max, sum-exp, smoothing sum), the SOFT sums (``A_q``, ``W_q`` and ``sum_j q_ij
    exp(a_ij - max)``, :class:`Soft`; without SOFT, ``qw`` is label smoothing's weight sum of the columns seen, and
    the smoothing sum is relative to the running max) and the tile's ``exp(a - max)`` (what
    :func:`_stats_step` stores with STORE_P). SOFT with COLUMN_STATS: the column partials also hold
    ``sum_i q_ic z_ic`` and ``sum_i q_ic`` (planes 2 and 3 of (4, R, C))."""
    m_new = tl.maximum(m_i, _tile_max(tile.top, hp, F, 1))
    e = exp(tile.a - m_new[:, None])
    if F.SOFT:
        if F.HAS_FOCAL:
            qp = qp * exp(m_i - m_new) + tl.sum(tile.q * e, 1)
        wq = tl.where(tile.mask, _smoothed_targets(tile.q, tile.cols, tile.col_mask, vecs, hp, 1.0 / (C * 1.0), F),
                      0.0)
        qa = qa + _smoothing_shift(qw, m_i, m_new)  # relative to the running max, as label smoothing's sum
        qa += tl.sum(tl.where(tile.mask, (tile.a - m_new[:, None]) * wq, 0.0), 1)
        qw += tl.sum(wq, 1)
    l_i = l_i * exp(m_i - m_new) + tl.sum(e, 1)
    if F.HAS_SMOOTH and not F.SOFT:  # (SOFT: in the targets, q')
        if F.HAS_WEIGHT:
            w_j = tl.load(vecs.weight + tile.cols, mask=tile.col_mask, other=0.0).to(tl.float32)[None, :]
        else:
            w_j = 1.0
        # sum_j w_j (a_j - running max), moved with the max; qw carries the weights seen, sum_j w_j
        sw = sw + _smoothing_shift(qw, m_i, m_new)
        sw += tl.sum(tl.where(tile.mask, (tile.a - m_new[:, None]) * w_j, 0.0), 1)
        qw += tl.sum(tl.where(tile.mask, w_j, 0.0), 1)
    if COLUMN_STATS:
        _column_partials(tile, row, colstats, pid_m, num_row_blocks, C, F)
    return m_new, l_i, sw, qa, qw, qp, e


@triton.jit
def _column_partials(tile, row, colstats, pid_m, num_row_blocks, C, F: tl.constexpr):
    """LADE's column partials of one tile (COLUMN_STATS): per column, over the tile's valid rows, max z and
    sum exp(z - max) into row block ``pid_m`` of ``colstats.partials`` (SOFT: also ``sum_i q_ic z_ic`` and
    ``sum_i q_ic``, planes 2 and 3)."""
    vmask = tile.mask & row.valid[:, None]
    zc = tl.where(vmask, tile.z, float("-inf"))
    c_max = tl.maximum(tl.max(zc, 0), NEG_BIG)
    c_sum = tl.sum(exp(zc - c_max[None, :]), 0)
    base = colstats.partials + tl.cast(pid_m, tl.int64) * C + tile.cols
    plane = tl.cast(num_row_blocks, tl.int64) * C
    tl.store(base, c_max, mask=tile.col_mask)
    tl.store(base + plane, c_sum, mask=tile.col_mask)
    if F.SOFT:
        # (q = 0 adds nothing: a class masked with -inf where no row targets it, 0 * -inf NaN otherwise)
        tl.store(base + 2 * plane, tl.sum(tl.where(vmask & (tile.q != 0), tile.q * tile.z, 0.0), 0),
                 mask=tile.col_mask)
        tl.store(base + 3 * plane, tl.sum(tl.where(vmask, tile.q, 0.0), 0), mask=tile.col_mask)


@triton.jit
def _thread_view(x, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, GROUP_SPAN: tl.constexpr):
    """A (BLOCK_M, BLOCK_N) tile as (BLOCK_M, BLOCK_N // GROUP_SPAN, GROUP_SPAN // GROUP, GROUP): column
    ``c = (r * GROUP_SPAN // GROUP + t) * GROUP + k``, ``k`` within one thread's vector of GROUP columns, ``t`` the
    thread along the row, ``r`` the repetition of the layout along it: axes 1 and 3 are one thread's elements."""
    return tl.reshape(x, (BLOCK_M, BLOCK_N // GROUP_SPAN, GROUP_SPAN // GROUP, GROUP))


@triton.jit
def _group_stats(tile, m_g, l_g, sw_g, qw_g, vecs, hp, F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP: tl.constexpr, GROUP_SPAN: tl.constexpr):
    """:func:`_tile_stats`'s (max, sum-exp, smoothing sum, weights) per thread: the tile viewed so that a thread's
    elements of a row are axes 1 and 3 (:func:`_thread_view`, GROUP its vector width and GROUP_SPAN the columns its
    row's threads cover once), so every reduction here stays in a thread (no shuffles, no shared memory, no barrier
    per tile: those were ~30% of LA's bf16 statistics loop). The accumulators are (BLOCK_M, GROUP_SPAN // GROUP)
    fp32, one per thread and row; :func:`_combine_groups` makes the row's at the end (one cross-thread reduction per
    row). Not for SOFT or STORE_P."""
    a = _thread_view(tile.a, BLOCK_M, BLOCK_N, GROUP, GROUP_SPAN)
    top = tl.max(_thread_view(tile.top, BLOCK_M, BLOCK_N, GROUP, GROUP_SPAN), 3)
    m_new = tl.maximum(m_g, _tile_max(top, hp, F, 1))
    l_g = l_g * exp(m_g - m_new) + tl.sum(tl.sum(exp(a - m_new[:, None, :, None]), 3), 1)
    if F.HAS_SMOOTH:
        mask = _thread_view(tile.mask, BLOCK_M, BLOCK_N, GROUP, GROUP_SPAN)
        if F.HAS_WEIGHT:
            w_j = tl.load(vecs.weight + tile.cols, mask=tile.col_mask, other=0.0).to(tl.float32)
            w = _thread_view(tl.broadcast_to(w_j[None, :], (BLOCK_M, BLOCK_N)), BLOCK_M, BLOCK_N, GROUP, GROUP_SPAN)
        else:
            w = 1.0
        sw_g = sw_g + _smoothing_shift(qw_g, m_g, m_new)
        sw_g += tl.sum(tl.sum(tl.where(mask, (a - m_new[:, None, :, None]) * w, 0.0), 3), 1)
        qw_g += tl.sum(tl.sum(tl.where(mask, w, 0.0), 3), 1)
    return m_new, l_g, sw_g, qw_g


@triton.jit
def _combine_groups(m_g, l_g, sw_g, qw_g, F: tl.constexpr):
    """The row statistics ``(max, sum-exp, smoothing sum, weights)`` of :func:`_group_stats`' per-group ones, the
    smoothing sum moved to the row's max as :func:`_tile_stats` moves it."""
    m_i = tl.max(m_g, 1)
    l_i = tl.sum(l_g * exp(m_g - m_i[:, None]), 1)
    sw = tl.zeros_like(m_i)
    qw = tl.zeros_like(m_i)
    if F.HAS_SMOOTH:
        sw = tl.sum(sw_g + _smoothing_shift(qw_g, m_g, m_i[:, None]), 1)
        qw = tl.sum(qw_g, 1)
    return m_i, l_i, sw, qw


# --- the passes over a row's columns --------------------------------------------------------------------------------

@triton.jit
def _stats_step(z_op, g_op, vecs, hp, rng, row, col_start, col_base, col_hi, m_i, l_i, sw, qa, qw, qp, colstats,
                pid_m, num_row_blocks, C, stored, tile, soft, F: tl.constexpr, COLUMN_STATS: tl.constexpr,
                STORE_P: tl.constexpr, MASK_COLS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """One tile of the statistics pass: load it (:func:`_adjusted_tile`) and fold it in (:func:`_tile_stats`).
    STORE_P: also store ``exp(a - max)`` over the tile of ``g_op`` and the running max (the tile's ``max``) at
    ``stored.maxima[row, tile]`` (:class:`StoredTiles`), for :func:`_grad_step`'s STORED pass."""
    t = _adjusted_tile(z_op, vecs, hp, rng, row, col_start, col_base, col_hi, soft, F, F.MARGIN_MODE != 0, MASK_COLS,
                       ALIGN, BLOCK_M, BLOCK_N, True)
    m_i, l_i, sw, qa, qw, qp, e = _tile_stats(t, row, m_i, l_i, sw, qa, qw, qp, vecs, hp, colstats, pid_m,
                                              num_row_blocks, C, F, COLUMN_STATS)
    if STORE_P:
        _store_tile(g_op, row, col_start, col_base, t.mask, e, ALIGN, BLOCK_N)
        tl.store(stored.maxima + row.idx.to(tl.int64) * stored.count + tile, m_i, mask=row.mask)
    return m_i, l_i, sw, qa, qw, qp


@triton.jit
def _grad_step(z_op, g_op, vecs, hp, rng, row, rg, colg, col_start, col_base, col_hi, stored, tile, soft,
               F: tl.constexpr, COLUMN_TERM: tl.constexpr, STORED: tl.constexpr, MASK_COLS: tl.constexpr,
               ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of a gradient pass: recompute it, write ``coef * d loss / d z`` (plus LADE's column term).
    STORED (gradient in the forward, after a STORE_P statistics pass): the tile is not recomputed (no z, class
    vectors or noise): ``p = e * exp(max_tile - row max - log sum-exp)`` from the ``e = exp(a - max_tile)`` that pass
    stored over ``g_op`` and its running max ``stored.maxima[row, tile]``. Rounding ``e`` to the gradient's dtype
    costs ``p`` one rounding more, relative to ``p``; a confident target keeps ``p_y - 1`` near exact: its ``a`` was
    the running max where it was stored, so its ``e`` is 1 (exactly in the interpreter; on the GPU, where ptxas
    fuses a scaled ``s a - max`` into one FMA, within the rounding error of ``s a``: half an ulp of it)."""
    # two versions of the tile's work: the one tile per row that holds its target, with the compares (margin,
    # one-hot), and every other tile without them (a branch per tile, not ~3 instructions per element)
    if STORED:
        e, cols, col_mask, mask = _load_tile(g_op, row, col_start, col_base, col_hi, MASK_COLS, ALIGN, BLOCK_N)
        m_t = tl.load(stored.maxima + row.idx.to(tl.int64) * stored.count + tile, mask=row.mask, other=0.0)
        p = e * exp((m_t - rg.row_max) - rg.log_sum)[:, None]
        if F.SOFT:  # no one-hot: the targets' tile
            q = _load_tile(Operand(soft.q, soft.stride_m, soft.stride_n), row, col_start, col_base, col_hi,
                           MASK_COLS, ALIGN, BLOCK_N)[0]
            g = _grad_from_p(p, e, q, cols, col_mask, row, rg, vecs, hp, colg, F, False, False)
        elif _holds_target(row.y, col_start, BLOCK_N):
            g = _grad_from_p(p, e, None, cols, col_mask, row, rg, vecs, hp, colg, F, False, True)
        else:
            g = _grad_from_p(p, e, None, cols, col_mask, row, rg, vecs, hp, colg, F, False, False)
    else:
        # the tile's loads before the branch (the pipeliner of a tl.range loop sees only the loads at its top level),
        # its margin, scale and mask after it (_finish_tile)
        # row pointers (_tile_ptrs), but not with LADE's column term (its registers)
        t = _adjusted_tile(z_op, vecs, hp, rng, row, col_start, col_base, col_hi, soft, F, False, MASK_COLS, ALIGN,
                           BLOCK_M, BLOCK_N, False, ROW_PTRS=not COLUMN_TERM)
        cols, mask = t.cols, t.mask
        if F.SOFT:
            g = _grad_tile(_finish_tile(t, row, hp, F, False, MASK_COLS), row, rg, vecs, hp, colg, F,
                           COLUMN_TERM, False)
        elif _holds_target(row.y, col_start, BLOCK_N):
            g = _grad_tile(_finish_tile(t, row, hp, F, F.MARGIN_MODE != 0, MASK_COLS), row, rg, vecs,
                           hp, colg, F, COLUMN_TERM, True)
        else:
            g = _grad_tile(_finish_tile(t, row, hp, F, False, MASK_COLS), row, rg, vecs, hp, colg, F,
                           COLUMN_TERM, False)
    _store_tile(g_op, row, col_start, col_base, mask, g, ALIGN, BLOCK_N, ROW_PTRS=not COLUMN_TERM and not STORED)


@triton.jit
def _column_range(cols_of, pid_s, END_ALIGN: tl.constexpr, LO_ALIGN: tl.constexpr = 0):
    """``[col_lo, col_hi)``: the classes of column split ``pid_s`` (:class:`Columns`), ``col_hi`` declared a multiple of
    END_ALIGN (the launcher makes it divide the Columns' base, end and split width: ``tiles.end_align``). The masked
    tile's column mask ``cols < col_hi`` is then constant over END_ALIGN columns, so its loads and stores (and the
    class vectors') move up to END_ALIGN elements an access: a row of 8142 classes in one tile loaded its 2-byte
    elements one by one (4096 x 8142 bf16, the gradient in the forward: 65.3 -> 53.3 SASS an element, with the
    whole-row tile's LO_ALIGN). ``col_lo`` keeps what Triton infers (16 where the base and split width are
    multiples of 16), or with LO_ALIGN > 0 is declared a multiple of LO_ALIGN instead (a power of two dividing the
    base, for a launch whose only split is 0: col_lo is the base). The claims are made here, on the operations that
    compute the two: a claim on a value this function returns would mark the call, and so both of its results."""
    col_lo = cols_of.base + pid_s * cols_of.per_split
    if LO_ALIGN > 0:
        col_lo = tl.multiple_of(col_lo, LO_ALIGN)
    col_hi = tl.minimum(col_lo + cols_of.per_split, cols_of.end)
    if END_ALIGN > 1:
        col_hi = tl.multiple_of(col_hi, END_ALIGN)
    return col_lo, col_hi


@triton.jit
def _full_tiles_end(col_lo, col_hi, BLOCK_N: tl.constexpr):
    """End of the whole tiles in ``[col_lo, col_hi)``: they need no column mask; a last partial tile follows."""
    return col_lo + ((col_hi - col_lo) // BLOCK_N) * BLOCK_N


@triton.jit
def _grad_columns(z_op, g_op, vecs, hp, rng, row, rg, colg, col_lo, col_base, col_hi, stored, soft, F: tl.constexpr,
                  COLUMN_TERM: tl.constexpr, STORED: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """A gradient pass over columns ``[col_lo, col_hi)`` (:func:`_grad_step`), **from the last column back**: the
    masked partial tile, then the whole tiles unmasked in descending order. The statistics pass just read the row
    front to back, so its most recent tiles (the ones most likely still in L2) are re-read first. Shared by the
    gradient-in-forward and the recompute backward (which also walks the rows backwards, see
    :func:`row_loss_grad`). STORED: from what a STORE_P statistics pass left (see :func:`_grad_step`)."""
    full_end = _full_tiles_end(col_lo, col_hi, BLOCK_N)
    num_full = (full_end - col_lo) // BLOCK_N
    tile0 = (col_lo - col_base) // BLOCK_N  # the tiles of STORED are numbered from col_base (all splits of a row)
    if full_end < col_hi:
        _grad_step(z_op, g_op, vecs, hp, rng, row, rg, colg, full_end, col_base, col_hi, stored, tile0 + num_full,
                   soft, F, COLUMN_TERM, STORED, True, ALIGN, BLOCK_M, BLOCK_N)
    # tl.range with STAGES > 1: Triton software-pipelines the loop's loads (async copies, STAGES tiles in flight);
    # a plain range() is never pipelined. The tile's column is a function of t alone, which the pipeliner needs
    for t in tl.range(0, num_full, num_stages=STAGES):
        _grad_step(z_op, g_op, vecs, hp, rng, row, rg, colg, full_end - (t + 1) * BLOCK_N, col_base, col_hi, stored,
                   tile0 + num_full - 1 - t, soft, F, COLUMN_TERM, STORED, False, ALIGN, BLOCK_M, BLOCK_N)


@triton.jit
def _forward_row_block(pid_m, pid_s, z_op, g_op, y_ptr, vecs, hp, rng, cols_of, out, part_ptr, colstats, stored,
                       wsum_ptr, inv_denom_ptr, own_inv, N, C, num_row_blocks, soft, F: tl.constexpr,
                       MEAN: tl.constexpr, SPLIT: tl.constexpr, SINGLE_TILE: tl.constexpr, GRAD_IN_FWD: tl.constexpr,
                       COLUMN_STATS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DENOM: tl.constexpr, STORE_P: tl.constexpr, STAGES: tl.constexpr,
                       GROUP: tl.constexpr, GROUP_SPAN: tl.constexpr, END_ALIGN: tl.constexpr):
    """The work of program (pid_m, pid_s) of :func:`row_loss_forward`: row block ``pid_m``, column split ``pid_s``."""
    row = _row_info(y_ptr, vecs, hp, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), N, C, F)
    # a whole-row tile's first column declared a multiple of no more than z's vector (ALIGN, and END_ALIGN, which
    # divides the base, col_lo here: one split): the class vectors then load as wide as z, in z's layout. Wider loads
    # of the log prior (4 fp32 where z moves 2, C = 8142) came with a conversion through 16 KB of shared memory and
    # 15 registers more (LA 4096 x 8142 bf16, triton 3.9: 79 > 64, one block of 16 warps an SM, not two)
    # (a conditional, not min(): triton 3.4-3.5 made min() of constexprs a tensor, which tl.multiple_of refuses)
    lo_align: tl.constexpr = (ALIGN if ALIGN < END_ALIGN else END_ALIGN) if SINGLE_TILE else 0
    col_lo, col_hi = _column_range(cols_of, pid_s, END_ALIGN, lo_align)
    m_i = tl.full((BLOCK_M,), NEG_BIG, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    sw = tl.zeros((BLOCK_M,), tl.float32)
    qa = tl.zeros((BLOCK_M,), tl.float32)  # SOFT: A_q, W_q and sum_j q_ij exp(a_ij - max) (:class:`Soft`)
    qw = tl.zeros((BLOCK_M,), tl.float32)
    qp = tl.zeros((BLOCK_M,), tl.float32)
    if F.SOFT:
        a_y = tl.zeros((BLOCK_M,), tl.float32)
    else:
        a_y, z_y = _target_logit(z_op, vecs, hp, rng, row, cols_of.base, col_lo, col_hi, F)
        if COLUMN_STATS:
            tl.store(colstats.target_logits + row.idx, z_y, mask=row.valid & (row.y >= col_lo) & (row.y < col_hi))
    if SINGLE_TILE:
        # the row is one tile: it stays in registers for a gradient in the same launch (no reload, and
        # GCL's noise is drawn once)
        t = _adjusted_tile(z_op, vecs, hp, rng, row, col_lo, cols_of.base, col_hi, soft, F, F.MARGIN_MODE != 0, True,
                           ALIGN, BLOCK_M, BLOCK_N, True, ONE_TILE=True, ROW_PTRS=True)
        m_i, l_i, sw, qa, qw, qp, e = _tile_stats(t, row, m_i, l_i, sw, qa, qw, qp, vecs, hp, colstats, pid_m,
                                                  num_row_blocks, C, F, COLUMN_STATS)
    else:
        full_end = _full_tiles_end(col_lo, col_hi, BLOCK_N)
        if GROUP > 0 and not F.SOFT and not STORE_P:  # per-thread statistics (_group_stats)
            m_g = tl.full((BLOCK_M, GROUP_SPAN // GROUP), NEG_BIG, tl.float32)
            l_g = tl.zeros((BLOCK_M, GROUP_SPAN // GROUP), tl.float32)
            sw_g = tl.zeros((BLOCK_M, GROUP_SPAN // GROUP), tl.float32)
            qw_g = tl.zeros((BLOCK_M, GROUP_SPAN // GROUP), tl.float32)
            for col_start in tl.range(col_lo, full_end, BLOCK_N, num_stages=STAGES):
                t = _adjusted_tile(z_op, vecs, hp, rng, row, col_start, cols_of.base, col_hi, soft, F,
                                   F.MARGIN_MODE != 0, False, ALIGN, BLOCK_M, BLOCK_N, True)
                m_g, l_g, sw_g, qw_g = _group_stats(t, m_g, l_g, sw_g, qw_g, vecs, hp, F, BLOCK_M, BLOCK_N, GROUP,
                                                    GROUP_SPAN)
                if COLUMN_STATS:
                    _column_partials(t, row, colstats, pid_m, num_row_blocks, C, F)
            m_i, l_i, sw, qw = _combine_groups(m_g, l_g, sw_g, qw_g, F)
        else:
            for col_start in tl.range(col_lo, full_end, BLOCK_N, num_stages=STAGES):  # pipelined: see _grad_columns
                m_i, l_i, sw, qa, qw, qp = _stats_step(z_op, g_op, vecs, hp, rng, row, col_start, cols_of.base,
                                                       col_hi, m_i, l_i, sw, qa, qw, qp, colstats, pid_m,
                                                       num_row_blocks, C, stored, (col_start - cols_of.base) // BLOCK_N,
                                                       soft, F, COLUMN_STATS, STORE_P, False, ALIGN, BLOCK_M, BLOCK_N)
        if full_end < col_hi:
            m_i, l_i, sw, qa, qw, qp = _stats_step(z_op, g_op, vecs, hp, rng, row, full_end, cols_of.base, col_hi,
                                                   m_i, l_i, sw, qa, qw, qp, colstats, pid_m, num_row_blocks, C,
                                                   stored, (full_end - cols_of.base) // BLOCK_N, soft, F,
                                                   COLUMN_STATS, STORE_P, True, ALIGN, BLOCK_M, BLOCK_N)
    if F.SOFT:
        a_y = qa
    if SPLIT:
        offs = row.idx.to(tl.int64) * cols_of.num_splits + (cols_of.first_split + pid_s)
        plane = tl.cast(N, tl.int64) * cols_of.num_splits
        tl.store(part_ptr + offs, m_i, mask=row.mask)
        tl.store(part_ptr + plane + offs, l_i, mask=row.mask)
        tl.store(part_ptr + 2 * plane + offs, a_y, mask=row.mask)
        tl.store(part_ptr + 3 * plane + offs, sw, mask=row.mask)
        if F.HAS_SMOOTH and not F.SOFT:  # the smoothing sum is relative to this split's max, and its weights
            tl.store(part_ptr + 4 * plane + offs, qw, mask=row.mask)
        if F.SOFT:  # (6, N, splits) partials
            tl.store(part_ptr + 4 * plane + offs, qw, mask=row.mask)
            tl.store(part_ptr + 5 * plane + offs, qp, mask=row.mask)
    else:
        log_sum = tl.log(l_i)
        p_t = None
        w_q = 0.0  # (not None: see RowGrad)
        if F.SOFT:
            row = Row(row.idx, row.mask, row.y, row.valid, row.margin, qw)
            p_t = qp / l_i
            w_q = qw
        coef = _finish_and_store_rows(m_i, log_sum, a_y, sw, qw, row, N, C, inv_denom_ptr, own_inv, out, hp, soft,
                                      p_t, F, MEAN, DENOM)
        if GRAD_IN_FWD:
            rg = _row_grad(m_i, log_sum, coef, row, wsum_ptr, C, w_q, F)
            if SINGLE_TILE:
                # the tile of the statistics pass, still in registers, with its exp(a - max): the max is the row's,
                # so p = e / sum-exp, a multiply an element (not a second exp: 2 instructions an element fewer); 0 on
                # ignored rows, as _row_grad makes it (a row masked whole with -inf has e = 0 and sum-exp 0)
                p = e * tl.where(row.valid, 1.0 / l_i, 0.0)[:, None]
                g = _grad_from_p(p, t.z, t.q, t.cols, t.col_mask, row, rg, vecs, hp, None, F, False, True)
                _store_tile(g_op, row, col_lo, cols_of.base, t.mask, g, ALIGN, BLOCK_N, ROW_PTRS=True)
            else:
                _grad_columns(z_op, g_op, vecs, hp, rng, row, rg, None, col_lo, cols_of.base, col_hi, stored, soft, F,
                              False, STORE_P, ALIGN, BLOCK_M, BLOCK_N, STAGES)


# --- the kernels ------------------------------------------------------------------------------------------------------

# seed: a fresh random value every step; specialising on its divisibility by 16 would compile a second
# variant mid-training (1 step in 16), so it (and the chunk's first row) is a plain runtime argument
@triton.jit(do_not_specialize=["seed", "noise_row0"])
def row_loss_forward(z_op, y_ptr, vecs, wsum_ptr, inv_denom_ptr, out, part_ptr, colstats, g_op, stored, N, C, cols_of,
                     num_row_blocks, hp, seed, noise_row0, seed_ptr, noise_table, red, soft, F: tl.constexpr,
                     MEAN: tl.constexpr, SPLIT: tl.constexpr, SINGLE_TILE: tl.constexpr, GRAD_IN_FWD: tl.constexpr,
                     COLUMN_STATS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     PERSISTENT: tl.constexpr, DENOM: tl.constexpr, REDUCE: tl.constexpr, RBLOCK: tl.constexpr,
                     STORE_P: tl.constexpr, STAGES: tl.constexpr, GROUP: tl.constexpr = 0,
                     GROUP_SPAN: tl.constexpr = 0, END_ALIGN: tl.constexpr = 1):
    """Grid (num_row_blocks = cdiv(N, BLOCK_M), num_splits), or fewer row programs when PERSISTENT. Online
    (max, sum-exp) over this program's columns (:class:`Columns` ``cols_of``); ``z_op`` (and ``g_op``, the gradient)
    hold the classes from ``cols_of.base`` on, so a caller may pass one class chunk of the logits.

    SPLIT: write partial (max, sumexp, a_y, sum w*(a - max), sum w) to ``part_ptr`` (see :class:`Columns`), for
    ``row_loss_combine`` (SOFT: (max, sumexp, A_q relative to the max, 0, W_q, sum q exp(a - max)): :class:`Soft`);
    else
    write the :class:`RowOutputs` ``out`` (and the gradient over ``g_op`` when GRAD_IN_FWD). COLUMN_STATS (LADE):
    per column, over this program's valid rows, write max z and sum exp(z - max) to ``colstats.partials``
    (2, num_row_blocks, C), and each valid row's raw target logit ``z_{i, y_i}`` to ``colstats.target_logits`` (N,)
    (by the one program whose columns hold the target; other rows are left unwritten).
    PERSISTENT: the grid has fewer row programs than the ``num_row_blocks`` row blocks and each program walks
    ``pid, pid + programs, ...``: fewer rows in flight, so that the gradient-in-forward's second pass over a long
    row (run from its end back, :func:`_grad_columns`) re-reads it from L2 rather than HBM.
    MEAN: the coefficient includes ``1 / sum_i w_{y_i}``: DENOM 0, read from ``inv_denom_ptr``; 1, summed by every
    program itself from the targets (no launch before this one; cheap when programs x N is small); 2, summed by the
    launch's first program and published in the counter slot ``red.counter`` (``inv_denom_ptr`` is that slot; needs
    REDUCE, whose last program clears it: :func:`fastlt.kernels.reduce.publish_inverse`).
    STORE_P (GRAD_IN_FWD over several tiles, or SPLIT for a gradient in the forward): the statistics pass stores
    each tile's ``exp(a - max)`` over ``g_op`` and the running max in ``stored`` (:class:`StoredTiles`); the gradient
    pass (here, or :func:`row_loss_grad`'s STORED after the combine of split rows) then scales those instead of
    recomputing the tile (no second read of z, class vectors or noise: GCL draws its noise once). The gradient is
    the same to one more rounding of ``p`` (``exp(a - max)`` in the gradient's dtype).
    REDUCE (not SPLIT): the program that finishes last also writes the batch loss to the :class:`Reduction` ``red``
    (:func:`fastlt.kernels.reduce.last_program_reduces`; 1: 'sum', 2: 'mean'). RBLOCK: the width of the in-kernel
    batch sums. SOFT: class-probability targets in ``soft`` (:class:`Soft`; ``y_ptr`` is not read), 'sum' only
    ('mean' is ``soft.row_scale`` = 1 / N), ``out.stats`` (3, N) with ``W_q`` third, SPLIT partials (6, N, splits).
    ALIGN: a power of two dividing the row stride of z and g; END_ALIGN: one dividing ``cols_of``'s base, end and
    split width (:func:`_column_range`).
    """
    rng = _noise_rng(seed, noise_row0, seed_ptr, noise_table, F)
    batch = Targets(y_ptr, vecs.weight, N, C, hp.ignore_index)
    own_inv = own_inverse(batch, F.HAS_WEIGHT, MEAN and DENOM == 1, RBLOCK)
    publish_inverse(red.counter, batch, F.HAS_WEIGHT, MEAN and DENOM == 2, RBLOCK)
    pid_s = tl.program_id(1)
    # two calls, not one loop whose trip count is 1 without PERSISTENT: that loop doubles the registers of the
    # one-row-block kernels (LA 131072 bf16 forward 39 -> 63, GCL 8142 fused 114 -> 255 with spills; kernel_report)
    if PERSISTENT:
        for pid_m in range(tl.program_id(0), num_row_blocks, tl.num_programs(0)):
            _forward_row_block(pid_m, pid_s, z_op, g_op, y_ptr, vecs, hp, rng, cols_of, out, part_ptr, colstats, stored,
                               wsum_ptr, inv_denom_ptr, own_inv, N, C, num_row_blocks, soft, F, MEAN, SPLIT,
                               SINGLE_TILE, GRAD_IN_FWD, COLUMN_STATS, ALIGN, BLOCK_M, BLOCK_N, DENOM, STORE_P,
                               STAGES, GROUP, GROUP_SPAN, END_ALIGN)
    else:
        _forward_row_block(tl.program_id(0), pid_s, z_op, g_op, y_ptr, vecs, hp, rng, cols_of, out, part_ptr, colstats,
                           stored, wsum_ptr, inv_denom_ptr, own_inv, N, C, num_row_blocks, soft, F, MEAN, SPLIT,
                           SINGLE_TILE, GRAD_IN_FWD, COLUMN_STATS, ALIGN, BLOCK_M, BLOCK_N, DENOM, STORE_P,
                           STAGES, GROUP, GROUP_SPAN, END_ALIGN)
    if REDUCE != 0:
        last_program_reduces(red, out.loss, batch, out.coef, inv_denom_ptr, own_inv, None, 0, F.HAS_WEIGHT, MEAN,
                             DENOM, REDUCE == 2, False, RBLOCK)


@triton.jit
def row_loss_combine(part_ptr, y_ptr, vecs, inv_denom_ptr, out, red, N, C, num_splits, hp, soft,
                     F: tl.constexpr, MEAN: tl.constexpr, DENOM: tl.constexpr, REDUCE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, RBLOCK: tl.constexpr):
    """Grid (cdiv(N, BLOCK_M),): merge the (5, N, num_splits) partials at ``part_ptr`` of the split rows of
    ``row_loss_forward`` into the :class:`RowOutputs` ``out`` (MEAN, DENOM, REDUCE and SOFT, with (6, N,
    num_splits) partials, as there)."""
    batch = Targets(y_ptr, vecs.weight, N, C, hp.ignore_index)
    own_inv = own_inverse(batch, F.HAS_WEIGHT, MEAN and DENOM == 1, RBLOCK)
    publish_inverse(red.counter, batch, F.HAS_WEIGHT, MEAN and DENOM == 2, RBLOCK)
    row = _row_info(y_ptr, vecs, hp, tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M), N, C, F)
    s = tl.arange(0, BLOCK_S)
    mask = row.mask[:, None] & (s[None, :] < num_splits)
    offs = row.idx.to(tl.int64)[:, None] * num_splits + s[None, :]
    plane = tl.cast(N, tl.int64) * num_splits
    p_max = tl.load(part_ptr + offs, mask=mask, other=NEG_BIG)
    p_sum = tl.load(part_ptr + plane + offs, mask=mask, other=0.0)
    a_y = tl.load(part_ptr + 2 * plane + offs, mask=mask, other=0.0)  # per split: a_y, or SOFT's A_q
    m_row = tl.max(p_max, 1)
    rescale = exp(p_max - m_row[:, None])
    l_row = tl.sum(p_sum * rescale, 1)
    p_t = None
    w_seen = None
    if F.SOFT:  # each split's A_q relative to its max, moved to the row's with its W_q: + W_s (m_s - m)
        w_s = tl.load(part_ptr + 4 * plane + offs, mask=mask, other=0.0)
        a_y += _smoothing_shift(w_s, p_max, m_row[:, None])
        sw = None
        qw = tl.sum(w_s, 1)
        p_t = tl.sum(tl.load(part_ptr + 5 * plane + offs, mask=mask, other=0.0) * rescale, 1) / l_row
        row = Row(row.idx, row.mask, row.y, row.valid, row.margin, qw)
    elif F.HAS_SMOOTH:  # each split's sum_j w_j (a_j - m_s), moved to the row's max: + W_s (m_s - m)
        w_s = tl.load(part_ptr + 4 * plane + offs, mask=mask, other=0.0)
        shift = _smoothing_shift(w_s, p_max, m_row[:, None])
        sw = tl.sum(tl.load(part_ptr + 3 * plane + offs, mask=mask, other=0.0) + shift, 1)
        w_seen = tl.sum(w_s, 1)
    else:
        sw = tl.zeros((BLOCK_M,), tl.float32)
    _finish_and_store_rows(m_row, tl.log(l_row), tl.sum(a_y, 1), sw, w_seen, row, N, C, inv_denom_ptr, own_inv, out,
                           hp, soft, p_t, F, MEAN, DENOM)
    if REDUCE != 0:
        last_program_reduces(red, out.loss, batch, out.coef, inv_denom_ptr, own_inv, None, 0, F.HAS_WEIGHT, MEAN,
                             DENOM, REDUCE == 2, False, RBLOCK)


@triton.jit(do_not_specialize=["seed", "noise_row0"])  # as row_loss_forward
def row_loss_grad(z_op, y_ptr, vecs, wsum_ptr, row_stats_ptr, coef_ptr, go_ptr, go_stride, col_term, g_op, N, C,
                  cols_of, hp, seed, noise_row0, seed_ptr, noise_table, stored, soft, F: tl.constexpr,
                  HAS_UPSTREAM: tl.constexpr, COLUMN_TERM: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, STORED: tl.constexpr, STAGES: tl.constexpr, END_ALIGN: tl.constexpr = 1):
    """Grid (cdiv(N, BLOCK_M), num_splits): recompute the tile from the saved fp32 (row max, log sum-exp) at
    ``row_stats_ptr`` and write ``upstream_i * coef_i * d loss_i / d z`` over ``g_op`` (plus LADE's column term
    :class:`ColumnTerm` ``col_term``, times the scalar upstream, when COLUMN_TERM); classes as in
    ``row_loss_forward``. STORED (the gradient in the forward of split rows): no recompute; ``g_op`` holds what a
    split ``row_loss_forward`` with STORE_P left there (``exp(a - max)`` per tile, the running maxima in ``stored``),
    which :func:`_grad_step` scales in place: z is not read and GCL's noise is not drawn again. SOFT: the targets'
    tiles from ``soft`` and ``W_q`` from ``row_stats[2]`` (:class:`Soft`). ALIGN and END_ALIGN as in
    ``row_loss_forward``."""
    rng = _noise_rng(seed, noise_row0, seed_ptr, noise_table, F)
    # the last programs of the forward (its last row blocks and splits, whose ends are the likeliest still in L2)
    # come first, and each row is walked from its end (:func:`_grad_columns`). The max(., 0) tells the compiler the
    # block index is not negative (without it the LADE gradient tile spills a register in its column loop).
    pid_m = tl.maximum(tl.num_programs(0) - 1 - tl.program_id(0), 0)
    pid_s = tl.num_programs(1) - 1 - tl.program_id(1)
    row = _row_info(y_ptr, vecs, hp, pid_m * BLOCK_M + tl.arange(0, BLOCK_M), N, C, F)
    row_max = tl.load(row_stats_ptr + row.idx, mask=row.mask, other=0.0)
    log_sum = tl.load(row_stats_ptr + N + row.idx, mask=row.mask, other=0.0)
    coef = tl.load(coef_ptr + row.idx, mask=row.mask, other=0.0)
    if HAS_UPSTREAM:
        coef = coef * tl.load(go_ptr + row.idx.to(tl.int64) * go_stride, mask=row.mask, other=0.0).to(tl.float32)
    w_q = 0.0  # (not None: see RowGrad)
    if F.SOFT:
        w_q = tl.load(row_stats_ptr + 2 * N + row.idx, mask=row.mask, other=0.0)
    rg = _row_grad(row_max, log_sum, coef, row, wsum_ptr, C, w_q, F)
    col_lo, col_hi = _column_range(cols_of, pid_s, END_ALIGN)
    colg = None
    if COLUMN_TERM:  # LADE: its loss is reduced, so the upstream gradient is a scalar
        col_go = 1.0
        if HAS_UPSTREAM:
            col_go = tl.load(go_ptr).to(tl.float32)
        col_a = col_term.columns
        col_b = col_a + C
        col_lse = col_b + C
        if F.SOFT:  # the class term weighs q: read per class in the tile
            colg = ColumnGrad(tl.zeros((BLOCK_M,), tl.float32), col_b, col_lse, col_go, col_a)
        else:
            colg = ColumnGrad(tl.load(col_a + row.y, mask=row.valid, other=0.0) * col_go, col_b, col_lse, col_go)
    _grad_columns(z_op, g_op, vecs, hp, rng, row, rg, colg, col_lo, cols_of.base, col_hi, stored,
                  soft, F, COLUMN_TERM, STORED, ALIGN, BLOCK_M, BLOCK_N, STAGES)
