"""fastlt.priors: log_prior, prior, ldam_margins, gcl_cloud, count smoothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastlt import priors as P
from fastlt.posthoc import logit_adjust

F64 = torch.float64


def random_counts(C, seed, hi=10_000):
    return torch.randint(1, hi, (C,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("C", [1, 2, 7, 1000])
def test_prior_and_log_prior(C):
    counts = random_counts(C, C)
    total = sum(int(c) for c in counts)
    expected = torch.tensor([int(c) / total for c in counts], dtype=F64)
    pi = P.prior(counts, dtype=F64)
    lp = P.log_prior(counts, dtype=F64)
    torch.testing.assert_close(pi, expected, rtol=1e-14, atol=0)
    torch.testing.assert_close(lp, torch.tensor([math.log(int(c) / total) for c in counts], dtype=F64),
                               rtol=1e-13, atol=1e-13)
    assert abs(pi.sum().item() - 1.0) < 1e-12
    torch.testing.assert_close(torch.logsumexp(lp, 0), torch.zeros((), dtype=F64), rtol=0, atol=1e-12)


def test_default_dtype_is_float32_and_dtype_argument():
    counts = [5, 3, 2]
    for fn in (P.prior, P.log_prior, P.ldam_margins, P.gcl_cloud):
        assert fn(counts).dtype == torch.float32
        assert fn(counts, dtype=F64).dtype == F64
        assert fn(counts, dtype=torch.bfloat16).dtype == torch.bfloat16
    expected = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    torch.testing.assert_close(P.log_prior(counts), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [list, tuple, np.array, torch.tensor,
                                  lambda c: torch.tensor(c, dtype=torch.int32),
                                  lambda c: torch.tensor(c, dtype=F64),
                                  lambda c: np.array(c, dtype=np.float32)])
def test_accepted_count_containers(make):
    counts = [40, 10, 30, 20]
    expected = torch.log(torch.tensor([0.4, 0.1, 0.3, 0.2], dtype=F64))
    torch.testing.assert_close(P.log_prior(make(counts), dtype=F64), expected, rtol=1e-13, atol=1e-13)


def test_ldam_margins():
    counts = torch.tensor([5000, 2000, 500, 100, 10, 1])
    for max_m in (0.5, 0.3, 1.0):
        m = P.ldam_margins(counts, max_m, dtype=F64)
        # the official formula: 1 / sqrt(sqrt(n)), rescaled so the largest is max_m
        m_list = 1.0 / np.sqrt(np.sqrt(counts.numpy().astype(np.float64)))
        m_list = m_list * (max_m / np.max(m_list))
        torch.testing.assert_close(m, torch.from_numpy(m_list), rtol=1e-14, atol=1e-15)
        assert m.max().item() == pytest.approx(max_m, abs=1e-15)
        assert m[-1].item() == pytest.approx(max_m, abs=1e-15)  # the rarest class has the largest margin
        # m_j * n_j^(1/4) is one constant
        ratio = m * counts.to(F64) ** 0.25
        torch.testing.assert_close(ratio, ratio[0].expand_as(ratio), rtol=1e-13, atol=0)
        assert torch.all(m[1:] > m[:-1])  # decreasing counts -> increasing margins
    assert torch.all(P.ldam_margins(counts, 0.0) == 0)
    assert P.ldam_margins(counts).max().item() == pytest.approx(0.5)  # default max_margin


def test_ldam_margins_equal_counts():
    m = P.ldam_margins([7, 7, 7], 0.4, dtype=F64)
    torch.testing.assert_close(m, torch.full((3,), 0.4, dtype=F64), rtol=1e-15, atol=0)


def test_gcl_cloud():
    counts = torch.tensor([30, 1000, 5, 200, 5, 1])
    cloud = P.gcl_cloud(counts, dtype=F64)
    n = counts.numpy().astype(np.float64)
    delta = np.log(n.max()) - np.log(n)
    torch.testing.assert_close(cloud, torch.from_numpy(delta / delta.max()), rtol=1e-14, atol=1e-15)
    assert cloud[1].item() == 0.0  # most frequent
    assert cloud[5].item() == pytest.approx(1.0, abs=1e-15)  # rarest
    assert cloud.min().item() >= 0.0 and cloud.max().item() <= 1.0
    assert cloud[2].item() == cloud[4].item()


@pytest.mark.parametrize("counts", [[4, 4, 4, 4], [1], [9]])
def test_gcl_cloud_equal_counts_is_zero_not_nan(counts):
    cloud = P.gcl_cloud(counts)
    assert torch.isfinite(cloud).all()
    assert torch.all(cloud == 0)
    assert cloud.shape == (len(counts),)


def test_gcl_cloud_ties_at_the_head():
    cloud = P.gcl_cloud([100, 100, 10], dtype=F64)
    torch.testing.assert_close(cloud, torch.tensor([0.0, 0.0, 1.0], dtype=F64))


def test_count_smoothing():
    counts = [10, 0, 5, 0]
    for eps in (0.5, 1.0, 1e-3):
        sm = torch.tensor(counts, dtype=F64) + eps
        torch.testing.assert_close(P.prior(counts, count_smoothing=eps, dtype=F64), sm / sm.sum(),
                                   rtol=1e-14, atol=0)
        torch.testing.assert_close(P.log_prior(counts, count_smoothing=eps, dtype=F64),
                                   torch.log(sm / sm.sum()), rtol=1e-13, atol=1e-13)
        m = sm ** -0.25
        torch.testing.assert_close(P.ldam_margins(counts, 0.5, count_smoothing=eps, dtype=F64),
                                   m * 0.5 / m.max(), rtol=1e-14, atol=1e-15)
        delta = sm.log().max() - sm.log()
        torch.testing.assert_close(P.gcl_cloud(counts, count_smoothing=eps, dtype=F64), delta / delta.max(),
                                   rtol=1e-14, atol=1e-15)
        assert torch.isfinite(P.log_prior(counts, count_smoothing=eps)).all()
    # smoothing also shifts non-zero counts (it is counts + eps, not a floor)
    lp = P.log_prior([3, 1], count_smoothing=1.0, dtype=F64)
    torch.testing.assert_close(lp, torch.log(torch.tensor([4 / 6, 2 / 6], dtype=F64)))


@pytest.mark.parametrize("fn", [P.prior, P.log_prior, P.ldam_margins, P.gcl_cloud])
def test_zero_count_without_smoothing_raises(fn):
    with pytest.raises(ValueError, match="count_smoothing"):
        fn([10, 0, 5])


@pytest.mark.parametrize("fn", [P.prior, P.log_prior, P.ldam_margins, P.gcl_cloud])
def test_bad_counts_raise(fn):
    with pytest.raises(ValueError, match="class_counts"):
        fn([10, -1, 5])
    with pytest.raises(ValueError, match="class_counts"):
        fn([])
    with pytest.raises(TypeError, match="class_counts"):
        fn([1.5, 2.0])
    with pytest.raises(ValueError, match="count_smoothing"):
        fn([1, 2], count_smoothing=-1.0)
    with pytest.raises(ValueError, match="count_smoothing"):
        fn([1, 2], count_smoothing=float("nan"))


def test_ldam_bad_max_margin():
    with pytest.raises(ValueError, match="max_margin"):
        P.ldam_margins([1, 2], float("inf"))
    with pytest.raises(ValueError, match="max_margin"):
        P.ldam_margins([1, 2], -0.1)


def test_counts_input_not_modified():
    counts = torch.tensor([3, 0, 2])
    P.log_prior(counts, count_smoothing=0.5)
    assert counts.tolist() == [3, 0, 2]


@pytest.mark.parametrize("fn", [P.prior, P.log_prior, P.ldam_margins, P.gcl_cloud])
@pytest.mark.parametrize("dtype", [torch.long, torch.bool, "float32", np.float32])
def test_priors_reject_a_non_floating_dtype(fn, dtype):
    """dtype= must be a floating torch dtype: an integer one would truncate the prior to zeros."""
    with pytest.raises(TypeError, match="dtype"):
        fn([1, 2, 3], dtype=dtype)


def test_counts_given_as_python_floats_are_read_in_float64():
    """A list of Python floats became torch's default float32: 16777217.0 read as 16777216 (the log prior 6e-8
    off) and 25000000.5 rounded to a whole number, so a non-whole count passed (priors, modules, shot_accuracy)."""
    from fastlt.metrics import shot_accuracy

    got = P.log_prior([16777217.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([math.log(16777217 / 16777218), math.log(1 / 16777218)], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # (float32 read: 6e-8 off)
    with pytest.raises(TypeError, match="whole numbers"):
        P.prior([25000000.5, 1.0])
    with pytest.raises(TypeError, match="whole numbers"):
        shot_accuracy([0], [0], [100.000001])


def test_counts_near_the_largest_float_do_not_overflow_the_prior():
    """Counts are scaled by their largest before they are summed: 2 x 1e308 overflowed the sum (log prior -inf,
    prior 0) in priors and in post-hoc adjustment."""
    counts = [1e308, 1e308, 1.0]
    want = torch.tensor([math.log(0.5), math.log(0.5), -math.log(2) - math.log(1e308)], dtype=torch.float64)
    torch.testing.assert_close(P.log_prior(counts, dtype=torch.float64), want)
    torch.testing.assert_close(P.prior(counts, dtype=torch.float64), want.exp())
    logits = torch.zeros(1, 3, dtype=torch.float64)
    torch.testing.assert_close(logit_adjust(logits, counts), -want[None])
