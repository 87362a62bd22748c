"""LADE on the row-operator kernels: PriorCE rows and LADER's column statistics in one pass.

``forward`` runs ``row_loss_forward`` with ``COLUMN_STATS`` (per row-block partial column max,
sum-exp, class sums and counts; no atomics, so deterministic), merges the partials with a few
(C,)-sized torch ops and returns LADER plus the vectors its gradient needs:
``d LADER / d z_ic = col_a_c * [y_i == c] + col_b_c * exp(z_ic - col_lse_c)`` for valid rows, with
``col_a_c = -pi_c / (N_c + 1e-8)`` and ``col_b_c = pi_c * (1 + 2*lambda*second_c)``.
"""

from __future__ import annotations

import math

import torch

from . import launch


def forward(z: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, remine_lambda: float, args: launch.RowOperatorArgs,
            config: launch.TileConfig | None = None):
    """Returns ``(loss_rows, lse, factor, lader, col_a, col_b, col_lse)`` (fp32; lader a 0-dim tensor)."""
    loss_rows, lse, factor, colstats = launch.forward(z, y, args, column_stats=True, config=config)
    n_valid = (y != args.ignore_index).sum().to(torch.float32)
    lader, col_a, col_b, col_lse = finish(merge_partials(colstats), pi, n_valid, remine_lambda)
    return loss_rows, lse, factor, lader, col_a, col_b, col_lse


def merge_partials(colstats: torch.Tensor) -> torch.Tensor:
    """(4, R, C) per-row-block partials (column max, sum-exp relative to it, class sums, class counts) ->
    (4, C) for the whole set of rows. Also merges the running stats of row chunks: stack them on dim 1."""
    c_max = colstats[0].amax(0)
    sum_exp = (colstats[1] * torch.exp(colstats[0] - c_max)).sum(0)
    return torch.stack([c_max, sum_exp, colstats[2].sum(0), colstats[3].sum(0)])


def finish(stats: torch.Tensor, pi: torch.Tensor, n_valid: torch.Tensor, remine_lambda: float):
    """LADER and its gradient vectors from the merged (4, C) column statistics of all N rows.

    ``n_valid``: 0-dim fp32 count of non-ignored rows. Returns ``(lader, col_a, col_b, col_lse)``."""
    C = stats.shape[1]
    col_lse = stats[0] + torch.log(stats[1])
    n_c = stats[3]
    first = stats[2] / (n_c + 1e-8)
    pi = pi.to(torch.float32)
    second = col_lse - torch.log(pi + 1e-9) + math.log(1.0 / C + 1e-9) - torch.log(n_valid)
    est = first - second - remine_lambda * second * second
    lader = torch.where(n_valid > 0, -(pi * est).sum(), torch.zeros((), device=stats.device))
    col_a = -pi / (n_c + 1e-8)
    col_b = pi * (1.0 + 2.0 * remine_lambda * second)
    return lader, col_a, col_b, col_lse
