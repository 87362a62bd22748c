"""LADE on the row-operator kernels: PriorCE rows and LADER's column statistics in one pass.

``forward`` runs ``row_loss_forward`` with ``COLUMN_STATS`` (per row-block partial column max and sum-exp,
and each row's target logit; no atomics, so deterministic), then one ``lade_columns`` launch merges the
partials down the row blocks, folds the per-class target sums and counts from ``(y_i, z_{i, y_i})`` and
finishes LADER's per-column terms, which gives LADER (per block of classes; the same launch's last program
adds them to the reduced PriorCE rows) plus the vectors its gradient needs:
``d LADER / d z_ic = col_a_c * [y_i == c] + col_b_c * exp(z_ic - col_lse_c)`` for valid rows, with
``col_a_c = -pi_c / (N_c + 1e-8)`` and ``col_b_c = pi_c * (1 + 2*lambda*second_c)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._operator import AdjustedCEArgs, as_f32
from . import launch, tiles
from .adjusted_ce import ColumnTerm
from .device_guard import on_its_device
from .numerics import NEG_BIG, exp
from .reduce import Reduction, Targets, last_program_reduces

_MAX_BLOCK_C = 256
_MIN_BLOCK_C = 32  # 128-byte rows of the (2, R, C) partials
_TARGET_PROGRAMS = 4096  # lade_columns' programs, as far as 32 to 256 classes each allow (~31 per H100 SM)


def _block_c(C: int) -> int:
    """Classes per ``lade_columns`` program: 32 (fewer for C < 32: one program), or more when C would make more
    than :data:`_TARGET_PROGRAMS` programs (at most 256).

    Its FINISH loop walks all N targets in ``4096 // BLOCK_C``-row steps and, in each step holding a target of its
    classes, bins them with a (rows x classes) compare: serial, latency-bound steps, half of which bin at C = 8142.
    256-class blocks made that 32 programs of 256 steps (one warp per SM); 32-class blocks make 255 programs of 32
    steps (4096 x 8142). At very large C the blocks grow, so the parts that the loss reduction sums stay at most
    4096 up to 1M classes (3907 there), within its in-kernel reduction."""
    block = tiles.next_pow2(max(1, tiles.cdiv(C, _TARGET_PROGRAMS)))
    return min(max(_MIN_BLOCK_C, min(_MAX_BLOCK_C, block)), tiles.next_pow2(max(C, 1)))


@triton.jit
def lade_columns(stat_ptr, R, C, y_ptr, zy_ptr, N, ignore_index, pi_ptr, alpha, remine_lambda, log_uniform, out_ptr,
                 loss_rows_ptr, weight_ptr, coef_ptr, red, FINISH: tl.constexpr, ACCUMULATE: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Y: tl.constexpr, REDUCE: tl.constexpr,
                 HAS_WEIGHT: tl.constexpr, RBLOCK: tl.constexpr, SOFT: tl.constexpr = False):
    """Grid (cdiv(C, BLOCK_C),). ``stat``: (2, R, C) fp32 partials (column max of z, sum exp(z - max)) of R row
    blocks, merged down R in fp32 (deterministic order).

    Without FINISH: ``out`` (2, C) = the merged statistics; with ACCUMULATE, ``out`` holds running statistics on
    entry (earlier row chunks) and the partials are merged into them. With FINISH, also over the N rows of ``y``
    (targets) and ``zy`` (their target logits, read only for valid rows in range): ``N_c`` = the rows of class c,
    ``first = sum_{i: y_i = c} z_ic / (N_c + 1e-8)``, ``n_valid`` = the rows that are not ``ignore_index``; then
    ``out`` (3, C) = (alpha * col_a, alpha * col_b, col_lse) with ``col_lse = LSE_i z_ic``,
    ``second = col_lse - log(pi + 1e-9) + log_uniform - log n_valid``, ``est = first - second - lambda second^2``
    (``log_uniform = log(1/C + 1e-9)``), and after them, at ``out[3 C + program]``, ``lader = alpha * sum_c -pi_c *
    est_c`` over the program's classes (0 when no row is valid: LADER = 0), summed by the loss reduction
    (``reduce_rows``' EXTRA): ``out`` is (3 C + programs,) fp32, one allocation.
    REDUCE (with FINISH; 1 'sum', 2 'mean'): that reduction here, by the last program to finish
    (:func:`fastlt.kernels.reduce.last_program_reduces`): ``red.out`` (0-dim) = the reduced PriorCE rows
    ``loss_rows`` (N,) plus every ``lader`` part, and for 'mean' the rows' coefficients ``coef`` (N,) times
    1 / sum_i w_{y_i} (``weight``: (C,) class weights when HAS_WEIGHT).

    SOFT (class-probability targets): ``stat`` (4, R, C) also holds per row block ``sum_i q_ic z_ic`` and
    ``sum_i q_ic``, summed down R (into ``out`` planes 2 and 3 without FINISH: (4, C)); FINISH takes them as the
    class sums and counts (``y`` and ``zy`` are not read) and every one of the N rows as valid."""
    c0 = tl.program_id(0) * BLOCK_C
    cols = c0 + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    c_t = tl.zeros((BLOCK_C,), tl.float32)  # SOFT: sum_i q_ic z_ic and sum_i q_ic
    c_n = tl.zeros((BLOCK_C,), tl.float32)
    if ACCUMULATE:
        c_max = tl.load(out_ptr + cols, mask=col_mask, other=NEG_BIG)
        c_sum = tl.load(out_ptr + C + cols, mask=col_mask, other=0.0)
        if SOFT:
            c_t = tl.load(out_ptr + 2 * C + cols, mask=col_mask, other=0.0)
            c_n = tl.load(out_ptr + 3 * C + cols, mask=col_mask, other=0.0)
    else:
        c_max = tl.full((BLOCK_C,), NEG_BIG, tl.float32)
        c_sum = tl.zeros((BLOCK_C,), tl.float32)
    plane = tl.cast(R, tl.int64) * C
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < R)[:, None] & col_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + cols[None, :]
        p_max = tl.load(stat_ptr + offs, mask=mask, other=NEG_BIG)
        p_sum = tl.load(stat_ptr + plane + offs, mask=mask, other=0.0)
        if SOFT:
            c_t += tl.sum(tl.load(stat_ptr + 2 * plane + offs, mask=mask, other=0.0), 0)
            c_n += tl.sum(tl.load(stat_ptr + 3 * plane + offs, mask=mask, other=0.0), 0)
        m_new = tl.maximum(c_max, tl.max(p_max, 0))
        c_sum = c_sum * exp(c_max - m_new) + tl.sum(p_sum * exp(p_max - m_new[None, :]), 0)
        c_max = m_new
    if FINISH:
        if SOFT:
            c_first = c_t
            c_count = c_n
            n_valid = N * 1.0
        else:
            c_first = tl.zeros((BLOCK_C,), tl.float32)
            c_count = tl.zeros((BLOCK_C,), tl.float32)
            n_acc = tl.zeros((BLOCK_Y,), tl.float32)
            for i0 in range(0, N, BLOCK_Y):
                i = i0 + tl.arange(0, BLOCK_Y)
                y = tl.load(y_ptr + i, mask=i < N, other=ignore_index).to(tl.int64)
                valid = (i < N) & (y != ignore_index)
                n_acc += valid.to(tl.float32)
                here = valid & (y >= c0) & (y < c0 + BLOCK_C) & (y < C)
                if tl.sum(here.to(tl.int32), 0) > 0:  # most row steps hold no target of these classes
                    zy = tl.load(zy_ptr + i, mask=here, other=0.0)
                    hit = here[:, None] & (y[:, None] == cols[None, :])
                    c_first += tl.sum(tl.where(hit, zy[:, None], 0.0), 0)
                    c_count += tl.sum(hit.to(tl.float32), 0)
            n_valid = tl.sum(n_acc, 0)
        pi = tl.load(pi_ptr + cols, mask=col_mask, other=0.0)
        # a class with no finite logit in a valid row (masked with -inf in each; no valid row): 0, as the reference
        # takes it (LADER finite, and the gradient's exp(z - col_lse) 0 there, not exp(-inf + inf))
        col_lse = tl.where(c_sum > 0, c_max + tl.log(c_sum), 0.0)
        inv_count = 1.0 / (c_count + 1e-8)
        second = col_lse - tl.log(pi + 1e-9) + log_uniform - tl.log(n_valid)
        est = c_first * inv_count - second - remine_lambda * second * second
        tl.store(out_ptr + cols, -alpha * pi * inv_count, mask=col_mask)
        tl.store(out_ptr + C + cols, alpha * pi * (1.0 + 2.0 * remine_lambda * second), mask=col_mask)
        tl.store(out_ptr + 2 * C + cols, col_lse, mask=col_mask)
        lader = alpha * tl.sum(tl.where(col_mask, -pi * est, 0.0), 0)
        lader_ptr = out_ptr + 3 * C  # the parts after the columns
        tl.store(lader_ptr + tl.program_id(0), tl.where(n_valid > 0, lader, 0.0))
        if REDUCE != 0:
            last_program_reduces(red, loss_rows_ptr, Targets(y_ptr, weight_ptr, N, C, ignore_index), coef_ptr, None,
                                 1.0, lader_ptr, tl.num_programs(0), HAS_WEIGHT, False, False, REDUCE == 2, True,
                                 RBLOCK)
    else:
        tl.store(out_ptr + cols, c_max, mask=col_mask)
        tl.store(out_ptr + C + cols, c_sum, mask=col_mask)
        if SOFT:
            tl.store(out_ptr + 2 * C + cols, c_t, mask=col_mask)
            tl.store(out_ptr + 3 * C + cols, c_n, mask=col_mask)


class PriorCERows(NamedTuple):
    """PriorCE's rows as ``launch.forward(..., column_stats=True, scale_mean=False)`` leaves them, for :func:`finish`
    to reduce together with LADER into ``out`` (0-dim): ``loss_rows`` and ``row_coef`` (N,) fp32 (for 'mean' the
    coefficients are scaled by 1 / sum_i w_{y_i} there too), and the operator's ``args`` (reduction, class
    weights)."""

    loss_rows: torch.Tensor
    row_coef: torch.Tensor
    args: AdjustedCEArgs
    out: torch.Tensor


class LaderTerms(NamedTuple):
    """LADER as :func:`finish` leaves it, scaled by ``alpha``: ``parts`` (P,) fp32, per block of classes the sum of
    ``alpha * -pi_c * est_c`` (their sum is ``alpha * LADER``; ``launch.reduce(..., extra=parts)`` adds it to the
    PriorCE reduction in the same launch), and ``columns`` (3, C) fp32, the gradient's column vectors ``col_a``,
    ``col_b`` (both times alpha) and ``col_lse`` (``launch.grad``'s ``column_term``)."""

    parts: torch.Tensor
    columns: torch.Tensor

    @property
    def col_a(self) -> torch.Tensor:
        return self.columns[0]

    @property
    def col_b(self) -> torch.Tensor:
        return self.columns[1]

    @property
    def col_lse(self) -> torch.Tensor:
        return self.columns[2]

    @property
    def column_term(self) -> ColumnTerm:
        return column_term(self.columns)

    def lader(self) -> torch.Tensor:
        """``alpha * LADER``, 0-dim fp32 (one reduction launch; the losses fold ``parts`` into their own)."""
        return self.parts.sum()

    @classmethod
    def of(cls, finished: torch.Tensor, C: int) -> LaderTerms:
        """The terms as views of the (3 C + P,) buffer ``lade_columns`` finishes into (columns, then parts)."""
        return cls(parts=finished[3 * C:], columns=finished[:3 * C].view(3, C))


def finished_numel(C: int) -> int:
    """The elements of the fp32 buffer LADE's finish writes for C classes: the (3, C) columns, then one LADER part
    per ``lade_columns`` program."""
    return 3 * C + tiles.cdiv(C, _block_c(C))


def column_term(columns: torch.Tensor, num_classes: int | None = None) -> ColumnTerm:
    """The gradient's :class:`fastlt.kernels.adjusted_ce.ColumnTerm` from ``columns``: the contiguous (3, C) fp32
    columns of :class:`LaderTerms` (rows ``col_a``, ``col_b``, ``col_lse``), or the whole (3 C + P,) fp32 buffer the
    finish writes (:func:`finished_numel`; ``num_classes`` C then)."""
    flat = columns.dim() == 1 and num_classes is not None and columns.numel() == finished_numel(num_classes)
    if not ((flat or (columns.dim() == 2 and columns.shape[0] == 3)) and columns.dtype == torch.float32
            and columns.is_contiguous()):
        raise ValueError(f"LADE's column term must be a contiguous (3, C) fp32 tensor (or the finish's (3 C + P,) "
                         f"buffer), got {tuple(columns.shape)} {columns.dtype}")
    return ColumnTerm(columns=columns)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()`` without its dispatch when ``t`` is (host time: a LADE step passes four such tensors)."""
    return t if t.is_contiguous() else t.contiguous()


def _checked_stats(stats: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
    """The caller's column statistics as the contiguous (planes, R, C) fp32 tensor :func:`_columns` takes ((2, C)
    and (4, C) read as R = 1), and ``into`` checked against them; ValueError naming the argument otherwise."""
    if stats.dim() == 2:
        stats = stats[:, None]
    if stats.dtype != torch.float32 or stats.dim() != 3 or stats.shape[0] not in (2, 4):
        raise ValueError(f"column statistics must be (2, R, C) or (2, C) fp32 ((4, ...) for class probabilities), "
                         f"got {tuple(stats.shape)} {stats.dtype}")
    planes, _, C = stats.shape
    if into is not None and (into.shape != (planes, C) or into.dtype != torch.float32 or not into.is_contiguous()):
        raise ValueError(f"into must be contiguous ({planes}, C) = ({planes}, {C}) fp32 running statistics, got "
                         f"{tuple(into.shape)} {into.dtype}")
    return _contiguous(stats)


def _columns(stats: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """One ``lade_columns`` launch merging checked column statistics (:func:`_checked_stats`) into a new (planes, C)
    tensor, or into the running ``into``; returns it."""
    planes, R, C = stats.shape
    out = into if into is not None else torch.empty((planes, C), dtype=torch.float32, device=stats.device)
    plan = _columns_plan(planes, R, C, 0, False, into is not None)
    if C > 0:  # every pointer a flag leaves unused points at `out` (never read through): no rows, no reduction
        lade_columns[plan.grid](stat_ptr=stats, y_ptr=out, zy_ptr=out, ignore_index=-100, pi_ptr=out, alpha=0.0,
                                remine_lambda=0.0, out_ptr=out, loss_rows_ptr=out, weight_ptr=out, coef_ptr=out,
                                red=Reduction(out=out, counter=out), REDUCE=0, HAS_WEIGHT=False, **plan.static)
    return out


class _ColumnsPlan(NamedTuple):
    """What a ``lade_columns`` launch takes from its sizes alone: the grid (one program per ``BLOCK_C`` classes, each
    writing one LADER part with FINISH), the values its fused reduction sums, and the kernel arguments."""

    grid: tuple
    reduced_values: int
    static: dict


@functools.lru_cache(maxsize=64)
def _columns_plan(planes: int, R: int, C: int, N: int, finish: bool, accumulate: bool) -> _ColumnsPlan:
    """The :class:`_ColumnsPlan` of merging (``planes``, R, C) partials (finishing LADER over N rows with
    ``finish``), made once per sizes (a module's steps repeat them)."""
    block_c = _block_c(C)
    programs = tiles.cdiv(C, block_c)
    static = dict(R=R, C=C, N=N, log_uniform=math.log(1.0 / C + 1e-9) if C else 0.0, FINISH=finish,
                  ACCUMULATE=accumulate,
                  BLOCK_R=max(1, min(4096 // block_c, tiles.next_pow2(max(R, 1)))),  # few classes: taller steps
                  BLOCK_C=block_c, BLOCK_Y=max(1, min(4096 // block_c, tiles.next_pow2(max(N, 1)))),
                  RBLOCK=tiles.rblock(4), SOFT=planes == 4, num_warps=4)
    # the last program sums the N rows and the parts (with no row or no class there is nothing to launch it in)
    return _ColumnsPlan((programs,), max(N, programs) if N and C else 0, static)


@on_its_device
def merge_partials(partials: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """(2, R, C) per-row-block partials (column max, sum-exp relative to it) -> (2, C) for the whole set of rows
    (one launch); (4, R, C) -> (4, C) for class-probability targets (their class sums and counts summed too).
    ``into``: running statistics of earlier row chunks, merged with the partials in place (and returned)."""
    return _columns(_checked_stats(partials, into), into)


@on_its_device
def finish(partials: torch.Tensor, y: torch.Tensor, target_logits: torch.Tensor, pi: torch.Tensor,
           ignore_index: int, remine_lambda: float, alpha: float = 1.0, *,
           rows: PriorCERows | None = None) -> LaderTerms:
    """LADER and its gradient vectors, scaled by ``alpha``, in one launch: ``partials`` the column (max, sum-exp) of
    all N rows, merged (2, C) or per row block (2, R, C); ``y`` (N,) targets and ``target_logits`` (N,) fp32 their
    logits ``z_{i, y_i}`` (read for valid rows only; see :class:`fastlt.kernels.adjusted_ce.ColumnStats`).

    ``pi``: (C,) fp32 prior. LADER is 0 when every row is ignored. Returns :class:`LaderTerms`.
    ``rows``: also write ``rows.out`` = the reduced PriorCE rows + alpha * LADER (what ``launch.reduce(...,
    extra=parts)`` gives), from the same launch's last program when a counter is at hand, else one launch after."""
    if y.is_floating_point():  # class probabilities (N, C): their sums are in the (4, ...) partials
        if y.dim() != 2 or partials.shape[0] != 4:
            raise ValueError(f"class-probability targets need (N, C) targets and (4, R, C) partials, got "
                             f"{tuple(y.shape)} and {tuple(partials.shape)}")
    elif y.shape != target_logits.shape or y.dim() != 1:
        raise ValueError(f"y and target_logits must both be (N,), got {tuple(y.shape)} and "
                         f"{tuple(target_logits.shape)}")
    stats = _checked_stats(partials, None)
    finished = _finish(stats, _contiguous(y), _contiguous(target_logits), as_f32(pi), ignore_index, remine_lambda,
                       alpha, rows)
    return LaderTerms.of(finished, stats.shape[2])


def _finish(stats: torch.Tensor, y: torch.Tensor, target_logits: torch.Tensor, pi: torch.Tensor, ignore_index: int,
            remine_lambda: float, alpha: float, rows: PriorCERows | None) -> torch.Tensor:
    """:func:`finish`'s launch, on checked (or self-made: LADE's :func:`forward`) statistics, contiguous targets and
    target logits and an fp32 prior; returns the (3 C + P,) buffer it finished into (:meth:`LaderTerms.of`). Its
    arguments but the tensors come from :func:`_finish_plan`, made once per sizes and LADE parameters (a small LADE
    step is host-bound: each call, branch and allocation here shows in it)."""
    planes, R, C = stats.shape
    dev = stats.device
    plan = _finish_plan(planes, R, C, y.shape[0], int(ignore_index), float(alpha), float(remine_lambda))
    out = torch.empty(3 * C + plan.grid[0], dtype=torch.float32, device=dev)  # the columns, then LADER's parts
    if rows is None:
        counter, reduce_mode, loss_rows, coef, loss, weight = None, 0, out, out, out, out
    else:
        loss_rows, coef, rows_args, loss = rows  # (a PriorCERows, or the plain tuple LADE's forward passes)
        if rows_args.reduction == "none":
            raise ValueError("LADE's rows reduce with LADER: reduction must be 'mean' or 'sum', got 'none'")
        counter, reduce_mode = launch.fused_reduction(dev, plan.reduced_values, plan.static["RBLOCK"],
                                                      rows_args.reduction)
        weight = out if rows_args.weight is None else rows_args.weight
    if C > 0:
        y_ptr, zy = y, target_logits
        if plan.static["SOFT"]:  # class probabilities: neither is read (their sums come with the partials)
            y_ptr = zy = out
        elif not plan.static["N"]:  # no row to read: pointers of the usual types, surely valid
            y_ptr, zy = torch.full((1,), int(ignore_index), device=dev), out
        # every pointer a flag leaves unused points at `out` (never read through)
        lade_columns[plan.grid](stat_ptr=stats, y_ptr=y_ptr, zy_ptr=zy, pi_ptr=pi, out_ptr=out,
                                loss_rows_ptr=loss_rows, weight_ptr=weight, coef_ptr=coef,
                                red=Reduction(out=loss, counter=out if counter is None else counter),
                                REDUCE=reduce_mode, HAS_WEIGHT=weight is not out, **plan.static)
    if rows is not None and counter is None:  # PriorCE's coefficients come unscaled (PriorCERows)
        launch.reduce_unless_fused(loss, counter, loss_rows, y, rows_args, row_coef=coef, scale_mean=False,
                                   extra=out[3 * C:])
    return out


@functools.lru_cache(maxsize=64)
def _finish_plan(planes: int, R: int, C: int, N: int, ignore_index: int, alpha: float,
                 remine_lambda: float) -> _ColumnsPlan:
    """:func:`_columns_plan` of a finish over N rows, its LADE parameters among the constant arguments."""
    plan = _columns_plan(planes, R, C, N, True, False)
    static = dict(plan.static, ignore_index=ignore_index, alpha=alpha, remine_lambda=remine_lambda)
    return plan._replace(static=static)


@on_its_device
def forward(z: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, alpha: float, remine_lambda: float,
            args: AdjustedCEArgs, config: tiles.TileConfig | None = None, out_dtype: torch.dtype = torch.float32):
    """LADE's forward: ``(loss, row_stats, row_coef, terms)`` with ``loss = PriorCE + alpha * LADER`` (0-dim,
    ``out_dtype``; PriorCE reduced by ``args.reduction``), the rows' fp32 statistics and coefficients (as
    :func:`fastlt.kernels.launch.forward`) and the :class:`LaderTerms`. Two launches: the rows with the column
    partials, and LADER's finish, whose last program adds the two."""
    loss, row_stats, row_coef, finished = forward_flat(z, _contiguous(y), as_f32(pi), alpha, remine_lambda, args,
                                                       config, out_dtype)
    return loss, row_stats, row_coef, LaderTerms.of(finished, z.shape[1])


@on_its_device
def forward_flat(z: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, alpha: float, remine_lambda: float,
                 args: AdjustedCEArgs, config: tiles.TileConfig | None = None,
                 out_dtype: torch.dtype = torch.float32, plans: launch.StepPlans | None = None):
    """:func:`forward` with the terms as the finish's (3 C + P,) fp32 buffer (:func:`finished_numel`; its first
    3 C elements are the column term), for targets ``y`` contiguous and the prior ``pi`` fp32 contiguous: the
    losses' step, which makes no views (host time). ``plans``: as :func:`fastlt.kernels.launch.forward`."""
    loss_rows, row_stats, row_coef, cols = launch.forward.__wrapped__(z, y, args, column_stats=True, config=config,
                                                                      scale_mean=False, plans=plans)
    loss = torch.empty((), dtype=out_dtype, device=z.device)
    # finish() on partials and target logits of our own making, which it need not check (host time)
    finished = _finish(cols.partials, y, cols.target_logits, pi, args.ignore_index, remine_lambda, alpha,
                       (loss_rows, row_coef, args, loss))  # PriorCERows' fields, as a plain tuple (host time)
    return loss, row_stats, row_coef, finished
