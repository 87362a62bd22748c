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
    N, C = z.shape
    loss_rows, lse, factor, colstats = launch.forward(z, y, args, column_stats=True, config=config)
    c_max = colstats[0].amax(0)
    col_lse = c_max + torch.log((colstats[1] * torch.exp(colstats[0] - c_max)).sum(0))
    n_c = colstats[3].sum(0)
    first = colstats[2].sum(0) / (n_c + 1e-8)
    pi = pi.to(torch.float32)
    n_valid = (y != args.ignore_index).sum().to(torch.float32)
    second = col_lse - torch.log(pi + 1e-9) + math.log(1.0 / C + 1e-9) - torch.log(n_valid)
    est = first - second - remine_lambda * second * second
    lader = torch.where(n_valid > 0, -(pi * est).sum(), torch.zeros((), device=z.device))
    col_a = -pi / (n_c + 1e-8)
    col_b = pi * (1.0 + 2.0 * remine_lambda * second)
    return loss_rows, lse, factor, lader, col_a, col_b, col_lse
