"""The law of GCL's noise over 10^6 draws: a Kolmogorov-Smirnov test against the clipped half-normal
``min(|N(0, 1/9)|, 1)`` and the correlation of neighbouring rows, columns, Philox words and counters, and of
neighbouring seeds. Philox4x32 with fewer rounds than Random123's default (``fastlt.noise.NOISE_ROUNDS``) must pass
these as the 10-round generator does; each test also shows it can fail (a 1% scale error, a copied row)."""

from __future__ import annotations

import math

import torch

from fastlt import noise as NZ

ROWS, COLS = 1000, 1000  # 10^6 draws: ~40 ms on two CPU threads
N = ROWS * COLS
# KS critical value at alpha = 0.001 for n = 10^6 (1.95 / sqrt(n)); the seed is fixed, so the test is deterministic
KS_BOUND = 1.95 / math.sqrt(N)
CORR_BOUND = 5 / math.sqrt(N)  # five standard errors of a correlation of independent draws


def clipped_half_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """P(min(|X|, 1) <= x) for X ~ N(0, 1/9), x in [0, 1): erf(3 x / sqrt(2)) (1 at x = 1: the clip's atom)."""
    return torch.special.erf(x * (3 / math.sqrt(2)))


def ks_statistic(e: torch.Tensor) -> float:
    """sup_x |F_n(x) - F(x)| of the draws ``e`` against the clipped half-normal, the atom at 1 included: below 1 the
    empirical CDF steps at each sorted draw; at 1 both CDFs reach 1, so the last gap is F_n(1-) - F(1-)."""
    x = e.double().flatten().sort().values
    n = x.numel()
    body = x[x < 1.0]
    m = body.numel()
    F = clipped_half_normal_cdf(body)
    i = torch.arange(1, m + 1, dtype=torch.float64)
    d = torch.maximum(i / n - F, F - (i - 1) / n).max().item() if m else 0.0
    atom = abs(m / n - math.erf(3 / math.sqrt(2)))  # the mass below the clip against erf(3 / sqrt 2)
    return max(d, atom)


def test_ks_against_the_clipped_half_normal():
    e = NZ.gcl_noise(20261206, ROWS, COLS)
    assert e.dtype == torch.float32 and e.min().item() >= 0.0 and e.max().item() <= 1.0
    d = ks_statistic(e)
    assert d < KS_BOUND, f"KS statistic {d:.2e} >= {KS_BOUND:.2e}"
    # the test has power: a 1% scale error moves the CDF by up to ~4.8e-3
    assert ks_statistic((e * 1.01).clamp_(max=1.0)) > KS_BOUND
    # and so does a sigma of 0.34 instead of 1/3 (the noise of |N(0, 1)| / 2.94)
    assert ks_statistic((e * 3 / 2.94).clamp_(max=1.0)) > KS_BOUND


def test_ks_on_a_class_shard_and_a_chunk_of_rows():
    """Any window of (row, column) has the law: rows from 10^6 on, columns from an offset off the Philox groups."""
    e = NZ.gcl_noise(7, ROWS, COLS, row_offset=10**6, col_offset=8142 * 3 + 5)
    assert ks_statistic(e) < KS_BOUND


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack((a.flatten().double(), b.flatten().double())))[0, 1].item()


def test_neighbours_are_uncorrelated():
    """Columns j, j + 1 (the two normals of one Box-Muller pair: |r cos|, |r sin|), j, j + 2 (two words of one
    Philox call), j, j + 8 (neighbouring counters c0), rows i, i + 1 (neighbouring counters c1): each pair's
    correlation within five standard errors of 0, over ~10^6 pairs. The squares too (a shared radius would show
    there first)."""
    e = NZ.gcl_noise(99, ROWS + 1, COLS + 8)
    pairs = {
        "column j, j+1": (e[:, :-1], e[:, 1:]),
        "column j, j+2": (e[:, :-2], e[:, 2:]),
        "counter c0, c0+1 (columns j, j+8)": (e[:, :-8], e[:, 8:]),
        "row i, i+1 (counter c1)": (e[:-1], e[1:]),
        "pair members (even j, j+1)": (e[:, 0:COLS:2], e[:, 1:COLS + 1:2]),
    }
    for name, (a, b) in pairs.items():
        assert abs(_corr(a, b)) < CORR_BOUND * math.sqrt(N / a.numel()), name
        assert abs(_corr(a * a, b * b)) < CORR_BOUND * math.sqrt(N / a.numel()), name + " (squares)"
    # the test has power: a row copied half the time correlates at ~0.5
    mixed = torch.where(torch.rand(ROWS, COLS + 8, generator=torch.Generator().manual_seed(0)) < 0.5, e[:-1], e[1:])
    assert abs(_corr(mixed, e[1:])) > 0.3


def test_neighbouring_seeds_are_uncorrelated():
    """Seeds s and s + 1 (the low key word) and s and s + 2^32 (the high one) give uncorrelated noise."""
    s = 2**40 + 12345
    base = NZ.gcl_noise(s, ROWS, COLS)
    for other in (s + 1, s + 2**32):
        assert abs(_corr(base, NZ.gcl_noise(other, ROWS, COLS))) < CORR_BOUND
