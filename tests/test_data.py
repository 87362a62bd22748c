"""fastlt.data: class counts, long-tailed profiles and splits, class-balanced and CBEN samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlt.data import (
    CBENSampler,
    ClassBalancedSampler,
    class_counts,
    long_tailed_counts,
    long_tailed_indices,
)
from fastlt.priors import prior

DRAWS = 200_000


def _labels_from_counts(counts, seed=0):
    """A shuffled label vector with the given per-class counts."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))]


def _empirical(sampler, labels, num_classes):
    idx = torch.tensor(list(sampler))
    return torch.bincount(labels[idx], minlength=num_classes).double() / idx.numel()


# ----------------------------------------------------------------------------- class_counts


def test_class_counts_values():
    got = class_counts(torch.tensor([2, 0, 2, 3, 2, 0]))
    assert got.dtype == torch.int64
    assert got.tolist() == [2, 0, 3, 1]


def test_class_counts_num_classes_pads_and_accepts_numpy_and_lists():
    assert class_counts(np.array([1, 1, 0], dtype=np.int32), num_classes=5).tolist() == [1, 2, 0, 0, 0]
    assert class_counts([4, 4], num_classes=5).tolist() == [0, 0, 0, 0, 2]
    assert class_counts(torch.tensor([], dtype=torch.long), num_classes=3).tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("labels", "kwargs", "exc", "match"),
    [
        (torch.tensor([0, -1, 2]), {}, ValueError, "labels"),
        (torch.tensor([0, 3]), {"num_classes": 3}, ValueError, "num_classes"),
        (torch.tensor([0.0, 1.0]), {}, TypeError, "labels"),
        (torch.tensor([True, False]), {}, TypeError, "labels"),
        ([0.5, 1], {}, TypeError, "labels"),
        (torch.zeros(2, 2, dtype=torch.long), {}, ValueError, "labels"),
        (torch.tensor([], dtype=torch.long), {}, ValueError, "labels"),
        (torch.tensor([0, 1]), {"num_classes": 0}, ValueError, "num_classes"),
        (torch.tensor([0, 1]), {"num_classes": 2.0}, TypeError, "num_classes"),
        ("abc", {}, TypeError, "labels"),
        (torch.tensor([0, 2**28]), {}, ValueError, "a stray id"),  # a stray id: no 2 GiB bincount
    ],
)
def test_class_counts_errors(labels, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        class_counts(labels, **kwargs)


# ----------------------------------------------------------------------------- profiles


def test_exp_profile_hand_computed():
    # floor(100 * 10^(-j/9)): 10^(-1/9) = 0.7743, 10^(-2/9) = 0.5995, ...
    assert long_tailed_counts(10, 100, 10) == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]


def test_exp_profile_reproduces_cifar10_lt():
    # CIFAR-10-LT, imbalance 100 (Cao et al. 2019 / Cui et al. 2019 splits).
    assert long_tailed_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_exp_profile_edge_cases():
    assert long_tailed_counts(1, 37, 10) == [37]
    assert long_tailed_counts(4, 8, 1) == [8, 8, 8, 8]
    assert long_tailed_counts(2, 98, 49) == [98, 2]  # no float round-down to 1
    assert long_tailed_counts(3, 5, 100) == [5, 1, 1]  # never below 1


def test_profiles_at_huge_counts():
    """The floors' guard was relative (x (1 + 1e-12)): from 10^12 up it added 1 to every count, so the head passed
    n_max and a step profile's tail passed its head."""
    assert long_tailed_counts(3, 10**12, 1.0) == [10**12] * 3
    assert long_tailed_counts(2, 10**13, 1.0, "step") == [10**13] * 2
    assert long_tailed_counts(2, 2**53, 1.0) == [2**53] * 2
    for profile in ("exp", "step"):
        counts = long_tailed_counts(6, 10**15 + 1, 7.0, profile)
        assert counts[0] == 10**15 + 1 and counts == sorted(counts, reverse=True)
        assert counts[-1] == (10**15 + 1) // 7


def test_step_profile_split_is_exact_for_decimal_fractions():
    """floor(C (1 - sf)) head and ceil(C sf) tail classes as exact arithmetic gives them: C * sf in floats is off
    by an ulp for many decimal fractions (10 * (1 - 0.9) = 0.9999999999999998, 90 * 0.3 = 27.000000000000004)."""
    from fractions import Fraction

    assert long_tailed_counts(10, 100, 10.0, "step", 0.9) == [100] + [10] * 9
    assert long_tailed_counts(5, 100, 10.0, "step", 0.8) == [100] + [10] * 4
    assert long_tailed_counts(90, 100, 10.0, "step", 0.3).count(10) == 27
    for sf in ("0.1", "0.2", "0.25", "0.3", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "0.99"):
        for C in range(1, 400):
            tail = math.ceil(C * Fraction(sf))
            assert long_tailed_counts(C, 100, 10.0, "step", float(sf)).count(10) == tail, (C, sf)


def test_step_profile_hand_computed():
    assert long_tailed_counts(10, 100, 10, profile="step") == [100] * 5 + [10] * 5
    assert long_tailed_counts(5, 100, 10, profile="step") == [100, 100, 10, 10, 10]
    assert long_tailed_counts(4, 100, 10, profile="step", step_fraction=0.25) == [100, 100, 100, 10]
    assert long_tailed_counts(3, 100, 1000, profile="step", step_fraction=1.0) == [1, 1, 1]
    assert long_tailed_counts(3, 100, 1000, profile="step", step_fraction=0.0) == [100, 100, 100]


@settings(max_examples=60, deadline=None)
@given(
    num_classes=st.integers(1, 200),
    max_count=st.integers(1, 10_000),
    ratio=st.floats(1.0, 500.0),
    profile=st.sampled_from(["exp", "step"]),
    step_fraction=st.floats(0.0, 1.0),
)
def test_profiles_are_non_increasing_and_bounded(num_classes, max_count, ratio, profile, step_fraction):
    counts = long_tailed_counts(num_classes, max_count, ratio, profile, step_fraction)
    assert len(counts) == num_classes
    assert all(isinstance(n, int) for n in counts)
    assert all(a >= b for a, b in zip(counts[:-1], counts[1:], strict=True))
    assert all(1 <= n <= max_count for n in counts)
    assert counts[-1] >= max(1, math.floor(max_count / ratio) - 1)
    tail_cut = num_classes * step_fraction  # step: ceil(C sf) tail classes, up to a rounding of C sf
    if profile == "exp" or math.ceil(tail_cut * (1 - 1e-9)) < num_classes:
        assert counts[0] == max_count
    if profile == "step" and counts[-1] < max_count:
        tail = num_classes - counts.count(max_count)
        assert math.ceil(tail_cut * (1 - 1e-9)) <= tail <= math.ceil(tail_cut * (1 + 1e-9))


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((10, 100, 0.5), {}, ValueError, "imbalance_ratio"),
        ((10, 100, float("inf")), {}, ValueError, "imbalance_ratio"),
        ((10, 100, "10"), {}, TypeError, "imbalance_ratio"),
        ((10, 0, 10), {}, ValueError, "max_count"),
        ((10, 10.0, 10), {}, TypeError, "max_count"),
        ((0, 100, 10), {}, ValueError, "num_classes"),
        ((10, 100, 10), {"profile": "linear"}, ValueError, "profile"),
        ((10, 100, 10), {"profile": "step", "step_fraction": 1.5}, ValueError, "step_fraction"),
        ((10, 100, 10), {"step_fraction": -0.1}, ValueError, "step_fraction"),
    ],
)
def test_long_tailed_counts_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        long_tailed_counts(*args, **kwargs)


# ----------------------------------------------------------------------------- long_tailed_indices


def test_long_tailed_indices_follow_profile():
    labels = _labels_from_counts([120] * 10)
    idx = long_tailed_indices(labels, 10)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == idx.numel()
    expected = long_tailed_counts(10, 120, 10)
    assert class_counts(labels[idx], num_classes=10).tolist() == expected


def test_long_tailed_indices_without_generator_keeps_first_samples():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    idx = long_tailed_indices(labels, 4, profile="exp")  # counts [4, 1]
    assert idx.tolist() == [0, 1, 2, 4, 6]


def test_long_tailed_indices_step_and_max_count():
    labels = _labels_from_counts([50, 60, 70, 80])
    idx = long_tailed_indices(labels, 5, profile="step", max_count=40, step_fraction=0.5)
    assert class_counts(labels[idx], num_classes=4).tolist() == [40, 40, 8, 8]


def test_long_tailed_indices_deterministic_given_generator():
    labels = _labels_from_counts([100] * 8, seed=3)
    a = long_tailed_indices(labels, 20, generator=torch.Generator().manual_seed(7))
    b = long_tailed_indices(labels, 20, generator=torch.Generator().manual_seed(7))
    c = long_tailed_indices(labels, 20, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for idx in (a, c):
        assert class_counts(labels[idx], num_classes=8).tolist() == long_tailed_counts(8, 100, 20)


def test_long_tailed_indices_errors():
    labels = _labels_from_counts([10, 10, 10])
    with pytest.raises(ValueError, match="max_count"):
        long_tailed_indices(labels, 2, max_count=11)
    for kwargs in ({}, {"max_count": 1}):  # no max_count serves an absent class: the message says to relabel
        with pytest.raises(ValueError, match="class 1.*relabel"):
            long_tailed_indices(torch.tensor([0, 0, 2, 2]), 2, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        long_tailed_indices(torch.tensor([], dtype=torch.long), 2)
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tailed_indices(labels, 0.1)
    with pytest.raises(TypeError, match="generator"):
        long_tailed_indices(labels, 2, generator=123)
    with pytest.raises(TypeError, match="labels"):
        long_tailed_indices(torch.rand(5), 2)


# ----------------------------------------------------------------------------- ClassBalancedSampler

# class 2 is absent: it must get no mass.
SAMPLER_COUNTS = [400, 100, 0, 25, 4]


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0])
def test_class_balanced_sampler_frequencies(q):
    labels = _labels_from_counts(SAMPLER_COUNTS)
    sampler = ClassBalancedSampler(labels, q=q, num_samples=DRAWS, generator=torch.Generator().manual_seed(0))
    assert len(sampler) == DRAWS
    n = torch.tensor(SAMPLER_COUNTS, dtype=torch.float64)
    expected = torch.where(n > 0, n.pow(q), torch.zeros_like(n))
    expected = expected / expected.sum()
    torch.testing.assert_close(sampler.class_probabilities, expected, rtol=1e-12, atol=1e-12)
    freq = _empirical(sampler, labels, len(SAMPLER_COUNTS))
    assert freq[2] == 0
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.006)


def test_class_balanced_sampler_uniform_within_class():
    labels = torch.tensor([0] * 4 + [1] * 16)
    g = torch.Generator().manual_seed(1)
    sampler = ClassBalancedSampler(labels, q=0.0, num_samples=DRAWS, generator=g)
    idx = torch.tensor(list(sampler))
    per_index = torch.bincount(idx, minlength=20).double() / DRAWS
    # class 0: mass 1/2 over 4 samples; class 1: mass 1/2 over 16 samples.
    expected = torch.tensor([1 / 8] * 4 + [1 / 32] * 16, dtype=torch.float64)
    torch.testing.assert_close(per_index, expected, rtol=0, atol=0.004)


def test_class_balanced_sampler_class_weights_are_per_sample():
    sampler = ClassBalancedSampler(torch.tensor([0, 0, 0, 0, 1]), q=0.5)
    # per-sample weight n^(q-1): 4^-0.5 = 0.5 and 1, normalised over classes.
    torch.testing.assert_close(sampler.class_weights, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))
    torch.testing.assert_close(sampler.class_probabilities, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))


def test_class_balanced_sampler_deterministic_and_default_length():
    labels = _labels_from_counts([30, 10, 5])
    a = list(ClassBalancedSampler(labels, generator=torch.Generator().manual_seed(5)))
    b = list(ClassBalancedSampler(labels, generator=torch.Generator().manual_seed(5)))
    c = list(ClassBalancedSampler(labels, generator=torch.Generator().manual_seed(6)))
    assert len(a) == 45 and a == b and a != c
    assert all(0 <= i < 45 for i in a)


def test_class_balanced_sampler_without_replacement():
    labels = _labels_from_counts([30, 10, 5])
    sampler = ClassBalancedSampler(labels, replacement=False, generator=torch.Generator().manual_seed(0))
    idx = list(sampler)
    assert sorted(idx) == list(range(45))
    # the first 15 draws of a class-balanced permutation lean toward the tail compared with uniform.
    heads = []
    for seed in range(200):
        s = ClassBalancedSampler(labels, num_samples=15, replacement=False,
                                 generator=torch.Generator().manual_seed(seed))
        heads.append(int((labels[torch.tensor(list(s))] == 2).sum()))
    assert np.mean(heads) > 15 * 5 / 45 + 1.0


def test_class_balanced_sampler_works_with_dataloader():
    labels = _labels_from_counts([6, 2])
    data = torch.utils.data.TensorDataset(torch.arange(8), labels)
    sampler = ClassBalancedSampler(labels, num_samples=8, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler)
    batches = list(loader)
    assert len(batches) == 2
    for x, y in batches:
        assert torch.equal(labels[x], y)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 500), min_size=1, max_size=30).filter(lambda c: sum(c) > 0),
    q=st.floats(-1.0, 2.0),
)
def test_class_balanced_sampler_weights_are_distributions(counts, q):
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    sampler = ClassBalancedSampler(labels, q=q)
    for w in (sampler.class_weights, sampler.class_probabilities):
        assert abs(float(w.sum()) - 1.0) < 1e-9
        present = torch.bincount(labels, minlength=len(counts))[: w.numel()] > 0
        assert bool((w[present] > 0).all()) and bool((w[~present] == 0).all())


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"q": float("nan")}, ValueError, "q"),
        ({"q": "0.5"}, TypeError, "q"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_samples": 100, "replacement": False}, ValueError, "num_samples"),
        ({"replacement": 1}, TypeError, "replacement"),
        ({"generator": 0}, TypeError, "generator"),
    ],
)
def test_class_balanced_sampler_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ClassBalancedSampler(torch.tensor([0, 1, 1]), **kwargs)


@pytest.mark.parametrize("q", [200.0, -200.0, 1e4])
def test_class_balanced_sampler_extreme_q_stays_a_distribution(q):
    """n^(q-1) overflows or underflows for large |q|; the weights are taken relative to the largest, so they stay
    a distribution (q = 200: all mass on the largest class) and the sampler draws."""
    labels = _labels_from_counts([100, 5, 1000, 1000][: 2 if q > 0 else 4])
    sampler = ClassBalancedSampler(labels, q=q, generator=torch.Generator().manual_seed(0))
    probs = sampler.class_probabilities
    assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-12
    n = sampler.counts.double()
    log_mass = q * n.log()  # p_j = n_j^q / sum n^q, in log space
    torch.testing.assert_close(probs, torch.softmax(log_mass, 0), rtol=1e-9, atol=1e-300)
    assert len(list(sampler)) == labels.numel()


def test_class_counts_of_empty_labels_with_num_classes():
    """[] (float in torch/numpy by default) counts as an empty label set: zeros when num_classes is given."""
    for empty in ([], (), np.array([]), torch.tensor([])):
        assert class_counts(empty, num_classes=5).tolist() == [0] * 5
    with pytest.raises(ValueError, match="num_classes"):
        class_counts([])


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_numpy_labels(dtype):
    labels = np.array([0, 1, 1, 3], dtype=dtype)
    assert class_counts(labels).tolist() == [1, 2, 0, 1]
    assert ClassBalancedSampler(labels).counts.tolist() == [1, 2, 0, 1]


def test_samplers_reject_bad_labels():
    for cls in (ClassBalancedSampler, CBENSampler):
        with pytest.raises(ValueError, match="labels"):
            cls(torch.tensor([], dtype=torch.long))
        with pytest.raises(TypeError, match="labels"):
            cls(torch.tensor([0.0, 1.0]))
        with pytest.raises(ValueError, match="labels"):
            cls(torch.tensor([0, -2]))
        with pytest.raises(ValueError, match="a stray id"):  # a stray id: no 2 GiB bincount
            cls(torch.tensor([0, 2**28]))


# ----------------------------------------------------------------------------- CBENSampler


def _cben_reference(counts, a, b):
    """The CBEN formula (docs/design.md, The losses), written out per class with math (absent classes get 0)."""
    present = [j for j, n in enumerate(counts) if n > 0]
    n_max = max(counts)
    delta = {j: math.log(n_max) - math.log(counts[j]) for j in present}
    lo, hi = min(delta.values()), max(delta.values())
    rho = [0.0] * len(counts)
    for j in present:
        beta = a if hi == lo else b * (delta[j] - lo) / (hi - lo) + a
        rho[j] = (1 - beta) / (1 - beta ** counts[j])
    total = sum(rho)
    return [r / total for r in rho]


@pytest.mark.parametrize(("a", "b"), [(0.999, 0.0009), (0.9999, 1e-5), (0.9, 0.05), (0.0, 0.0)])
def test_cben_weights_match_formula(a, b):
    counts = [5000, 1200, 0, 300, 37, 5]
    sampler = CBENSampler(_labels_from_counts(counts), a=a, b=b)
    assert sampler.class_weights.dtype == torch.float64
    expected = torch.tensor(_cben_reference(counts, a, b), dtype=torch.float64)
    torch.testing.assert_close(sampler.class_weights, expected, rtol=1e-10, atol=1e-15)


def test_cben_defaults_span_paper_betas():
    # Head class: beta = a = 0.999; tail class: beta = a + b = 0.9999 (the paper's range).
    counts = [1000, 10]
    sampler = CBENSampler(_labels_from_counts(counts))
    rho = [(1 - 0.999) / (1 - 0.999**1000), (1 - 0.9999) / (1 - 0.9999**10)]
    expected = torch.tensor(rho, dtype=torch.float64) / sum(rho)
    torch.testing.assert_close(sampler.class_weights, expected, rtol=1e-12, atol=0)
    assert sampler.class_weights[1] > sampler.class_weights[0]


def test_cben_equal_counts_is_uniform():
    sampler = CBENSampler(_labels_from_counts([50, 50, 50, 50]), a=0.99, b=0.005)
    torch.testing.assert_close(sampler.class_weights, torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(sampler.class_probabilities, torch.full((4,), 0.25, dtype=torch.float64))


def test_cben_empirical_frequencies():
    counts = [800, 200, 0, 50, 10]
    labels = _labels_from_counts(counts)
    g = torch.Generator().manual_seed(2)
    sampler = CBENSampler(labels, a=0.99, b=0.009, num_samples=DRAWS, generator=g)
    assert len(sampler) == DRAWS
    rho = torch.tensor(_cben_reference(counts, 0.99, 0.009), dtype=torch.float64)
    mass = rho * torch.tensor(counts, dtype=torch.float64)
    expected = mass / mass.sum()
    torch.testing.assert_close(sampler.class_probabilities, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(_empirical(sampler, labels, len(counts)), expected, rtol=0, atol=0.006)


def test_cben_deterministic():
    labels = _labels_from_counts([40, 10, 3])
    a = list(CBENSampler(labels, generator=torch.Generator().manual_seed(9)))
    b = list(CBENSampler(labels, generator=torch.Generator().manual_seed(9)))
    assert a == b and len(a) == 53


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 3_000), min_size=1, max_size=20).filter(lambda c: sum(c) > 0),
    a=st.floats(0.0, 0.9999),
    b_frac=st.floats(0.0, 0.99),
)
def test_cben_weights_are_distributions(counts, a, b_frac):
    b = (1.0 - a) * b_frac
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    sampler = CBENSampler(labels, a=a, b=b)
    n = torch.tensor(counts[: sampler.class_weights.numel()])
    for w in (sampler.class_weights, sampler.class_probabilities):
        assert abs(float(w.sum()) - 1.0) < 1e-9
        assert bool((w[n == 0] == 0).all()) and bool((w[n > 0] > 0).all())


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"a": 1.0}, ValueError, "a must be < 1"),
        ({"a": -0.1}, ValueError, "a must be >= 0"),
        ({"a": "0.9"}, TypeError, "a must be a real"),
        ({"b": -1e-3}, ValueError, "b must be >= 0"),
        ({"a": 0.999, "b": 0.001}, ValueError, "a \\+ b"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"generator": "seed"}, TypeError, "generator"),
    ],
)
def test_cben_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        CBENSampler(torch.tensor([0, 0, 1]), **kwargs)


def test_without_replacement_beyond_multinomials_limit_has_the_same_law(monkeypatch):
    """torch.multinomial draws from at most 2^24 categories without replacement (a RuntimeError beyond): past that
    the sampler races exponential clocks (Efraimidis-Spirakis), the same law. Checked with the limit lowered: the
    first and second draws' frequencies against the exact sequential probabilities."""
    import fastlt.data as D

    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    monkeypatch.setattr(D, "MULTINOMIAL_LIMIT", 0)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([D._without_replacement(w, 2, g) for _ in range(20000)])
    assert all(len(set(row.tolist())) == 2 for row in draws[:100])
    p = w / w.sum()
    second = torch.stack([sum(p[i] * p[j] / (1 - p[i]) for i in range(4) if i != j) for j in range(4)])
    for col, want in ((0, p), (1, second)):
        freq = torch.bincount(draws[:, col], minlength=4).double() / len(draws)
        assert (freq - want).abs().max() < 0.015, (col, freq, want)
    labels = _labels_from_counts([50, 10, 3])
    s = ClassBalancedSampler(labels, q=0.0, replacement=False, seed=7)
    assert sorted(s) == list(range(labels.numel()))


def test_sampler_takes_a_numpy_seed_and_keeps_its_own_labels():
    labels = _labels_from_counts([20, 5, 2])
    s = ClassBalancedSampler(labels, replacement=False, seed=np.int64(4))
    t = ClassBalancedSampler(labels, replacement=False, seed=4)
    before = list(s)
    assert s.seed == 4 and before == list(t)
    labels.zero_()  # the caller's tensor edited afterwards: the sampler's draws do not change
    assert list(s) == before


def test_reversed_numpy_labels_and_counts():
    """A reversed numpy array (np.flip, [::-1]: a negative stride, which torch.as_tensor refuses) is taken as any
    array, by the labels' and the counts' readers alike."""
    labels = np.array([0, 0, 0, 1, 1, 2])
    assert torch.equal(class_counts(labels[::-1]), class_counts(labels))
    counts = np.sort(np.array([3, 300, 30]))[::-1]
    torch.testing.assert_close(prior(counts), prior(counts.copy()))
    assert list(ClassBalancedSampler(labels[::-1], seed=3)) == list(ClassBalancedSampler(labels[::-1].copy(), seed=3))
