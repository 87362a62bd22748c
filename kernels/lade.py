"""LADE on the row-operator kernels: PriorCE rows and LADER's column statistics in one pass.

``forward`` runs ``row_loss_forward`` with ``COLUMN_STATS`` (per row-block partial column max,
sum-exp, class sums and counts; no atomics, so deterministic), then one ``lade_columns`` launch merges
the partials down the row blocks and finishes LADER's per-column terms, which gives LADER plus the
vectors its gradient needs:
``d LADER / d z_ic = col_a_c * [y_i == c] + col_b_c * exp(z_ic - col_lse_c)`` for valid rows, with
``col_a_c = -pi_c / (N_c + 1e-8)`` and ``col_b_c = pi_c * (1 + 2*lambda*second_c)``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import launch
from .row_operator import NEG_BIG

_BLOCK_C = 256


@triton.jit
def lade_columns(stat_ptr, R, C, pi_ptr, n_valid_ptr, remine_lambda, log_uniform, out_ptr,
                 FINISH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Grid (cdiv(C, BLOCK_C),). ``stat``: (4, R, C) fp32 partials (column max, sum exp(z - max), class sum
    of z, class count) of R row blocks; merged down R in fp32 (deterministic order).

    Without FINISH: ``out`` (4, C) = the merged statistics. With FINISH: ``out`` (4, C) = (col_a, col_b,
    col_lse, -pi * est) with ``col_lse = LSE_i z_ic``, ``first = sum / (N_c + 1e-8)``,
    ``second = col_lse - log(pi + 1e-9) + log_uniform - log n_valid``, ``est = first - second - lambda second^2``
    (``log_uniform = log(1/C + 1e-9)``, ``n_valid`` a device fp32 scalar)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    c_max = tl.full((BLOCK_C,), NEG_BIG, tl.float32)
    c_sum = tl.zeros((BLOCK_C,), tl.float32)
    c_first = tl.zeros((BLOCK_C,), tl.float32)
    c_count = tl.zeros((BLOCK_C,), tl.float32)
    plane = tl.cast(R, tl.int64) * C
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < R)[:, None] & col_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + cols[None, :]
        p_max = tl.load(stat_ptr + offs, mask=mask, other=NEG_BIG)
        p_sum = tl.load(stat_ptr + plane + offs, mask=mask, other=0.0)
        m_new = tl.maximum(c_max, tl.max(p_max, 0))
        c_sum = c_sum * tl.exp(c_max - m_new) + tl.sum(p_sum * tl.exp(p_max - m_new[None, :]), 0)
        c_max = m_new
        c_first += tl.sum(tl.load(stat_ptr + 2 * plane + offs, mask=mask, other=0.0), 0)
        c_count += tl.sum(tl.load(stat_ptr + 3 * plane + offs, mask=mask, other=0.0), 0)
    if FINISH:
        pi = tl.load(pi_ptr + cols, mask=col_mask, other=0.0)
        n_valid = tl.load(n_valid_ptr)
        col_lse = c_max + tl.log(c_sum)
        inv_count = 1.0 / (c_count + 1e-8)
        second = col_lse - tl.log(pi + 1e-9) + log_uniform - tl.log(n_valid)
        est = c_first * inv_count - second - remine_lambda * second * second
        tl.store(out_ptr + cols, -pi * inv_count, mask=col_mask)
        tl.store(out_ptr + C + cols, pi * (1.0 + 2.0 * remine_lambda * second), mask=col_mask)
        tl.store(out_ptr + 2 * C + cols, col_lse, mask=col_mask)
        tl.store(out_ptr + 3 * C + cols, -pi * est, mask=col_mask)
    else:
        tl.store(out_ptr + cols, c_max, mask=col_mask)
        tl.store(out_ptr + C + cols, c_sum, mask=col_mask)
        tl.store(out_ptr + 2 * C + cols, c_first, mask=col_mask)
        tl.store(out_ptr + 3 * C + cols, c_count, mask=col_mask)


def _columns(stats: torch.Tensor, finish_args=None) -> torch.Tensor:
    if stats.dim() == 2:
        stats = stats[:, None]
    if stats.dtype != torch.float32 or stats.shape[0] != 4:
        raise ValueError(f"column statistics must be (4, R, C) fp32, got {tuple(stats.shape)} {stats.dtype}")
    stats = stats.contiguous()
    _, R, C = stats.shape
    out = torch.empty((4, C), dtype=torch.float32, device=stats.device)
    if C == 0:
        return out
    pi, n_valid, remine_lambda = finish_args if finish_args is not None else (out, out, 0.0)
    block_c = min(_BLOCK_C, triton.next_power_of_2(C))
    block_r = max(1, min(4096 // block_c, triton.next_power_of_2(max(R, 1))))  # few classes: taller steps
    lade_columns[(triton.cdiv(C, block_c),)](
        stats, R, C, pi, n_valid, float(remine_lambda), math.log(1.0 / C + 1e-9), out,
        FINISH=finish_args is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out


def merge_partials(colstats: torch.Tensor) -> torch.Tensor:
    """(4, R, C) per-row-block partials (column max, sum-exp relative to it, class sums, class counts) ->
    (4, C) for the whole set of rows (one launch). Also merges the running stats of row chunks: stack them
    on dim 1."""
    return _columns(colstats)


def finish(stats: torch.Tensor, pi: torch.Tensor, n_valid: torch.Tensor, remine_lambda: float):
    """LADER and its gradient vectors from column statistics of all N rows: merged (4, C), or the (4, R, C)
    partials (merged in the same launch).

    ``pi``: (C,) fp32 prior; ``n_valid``: fp32 device scalar, the count of non-ignored rows (LADER is 0
    when it is 0). Returns ``(lader, col_a, col_b, col_lse)``."""
    pi = pi.to(torch.float32).contiguous()
    out = _columns(stats, (pi, n_valid.to(torch.float32).reshape(1), remine_lambda))
    lader = torch.where(n_valid > 0, out[3].sum(), torch.zeros((), device=out.device))
    return lader.reshape(()), out[0], out[1], out[2]


def forward(z: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, remine_lambda: float, args: launch.RowOperatorArgs,
            config: launch.TileConfig | None = None):
    """Returns ``(prior_ce, lse, factor, lader, col_a, col_b, col_lse)`` (fp32; ``prior_ce`` reduced by
    ``args.reduction``, ``lader`` a 0-dim tensor): three launches (rows + column partials, the reduction,
    the column merge and finish) and one torch count."""
    loss_rows, lse, factor, colstats = launch.forward(z, y, args, column_stats=True, config=config, scale_mean=False)
    prior_ce = launch.reduce(loss_rows, y, args, factor=factor)
    n_valid = (y != args.ignore_index).sum(dtype=torch.float32)
    lader, col_a, col_b, col_lse = finish(colstats, pi, n_valid, remine_lambda)
    return prior_ce, lse, factor, lader, col_a, col_b, col_lse
