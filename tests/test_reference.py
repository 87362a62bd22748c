"""The pure-PyTorch reference path (``fastlt.reference``) against independent formulations.

Every expected value here is written from scratch in the test (``F.cross_entropy`` on explicitly
adjusted logits, the official LDAM / GCL / LADE code structure), never by calling fastlt twice.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlt import reference as R
from fastlt.noise import draw_seed, gcl_noise
from fastlt.priors import prior

F64 = torch.float64


# ----------------------------------------------------------------------------------------------
# helpers (independent of fastlt)
# ----------------------------------------------------------------------------------------------

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_inputs(N, C, seed, *, scale=2.0, dtype=F64, max_count=500, absent=None):
    """Logits (N, C), targets (N,), counts (C,), seeded. ``absent``: a class never targeted."""
    g = gen(seed)
    z = (torch.randn(N, C, generator=g, dtype=F64) * scale).to(dtype)
    hi = C - 1 if (absent is not None and C > 1) else C
    y = torch.randint(0, hi, (N,), generator=g)
    if absent is not None and C > 1:
        y = torch.where(y >= absent, y + 1, y)  # skip class `absent`
    counts = torch.randint(1, max_count, (C,), generator=g)
    return z, y, counts


def make_cosine(N, C, seed, dtype=F64):
    g = gen(seed)
    cos = (torch.rand(N, C, generator=g, dtype=F64) * 2 - 1).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    counts = torch.randint(1, 2000, (C,), generator=g)
    counts[0] = 5000  # a clear head class
    return cos, y, counts


def log_pi_of(counts, dtype=F64):
    n = counts.to(F64)
    return torch.log(n / n.sum()).to(dtype)


def cloud_of(counts, dtype=F64):
    n = counts.to(F64)
    delta = n.log().max() - n.log()
    return (delta / delta.max()).to(dtype)


def grad_of(fn, x, *args):
    """fn(x, *args) and d sum(fn) / dx (extra args: loop variables, bound explicitly)."""
    x = x.detach().clone().requires_grad_(True)
    out = fn(x, *args)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


def assert_close(a, b, **kw):
    torch.testing.assert_close(a, b, equal_nan=True, **kw)


SHAPES = [(1, 1), (1, 7), (3, 7), (257, 7), (3, 1000), (16, 3)]


# ----------------------------------------------------------------------------------------------
# logit adjustment / Balanced Softmax
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N,C", SHAPES)
@pytest.mark.parametrize("tau", [1.0, 2.0, -0.7])
def test_logit_adjusted_matches_shifted_cross_entropy(N, C, tau):
    z, y, counts = make_inputs(N, C, seed=N * 1000 + C)
    log_pi = log_pi_of(counts)
    for reduction in ("mean", "sum", "none"):
        got, g_got = grad_of(lambda x, r: R.logit_adjusted_cross_entropy(x, y, log_pi, tau, reduction=r),
                             z, reduction)
        exp, g_exp = grad_of(lambda x, r: F.cross_entropy(x + tau * log_pi, y, reduction=r), z, reduction)
        assert_close(got, exp, rtol=1e-12, atol=1e-12)
        assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)


def test_logit_adjusted_gradient_formula():
    """Logit adjustment (docs/design.md, The losses): d loss_i / d z_ij = softmax(z_i + tau*log_pi)_j - [j == y_i]
    (reduction='sum')."""
    z, y, counts = make_inputs(9, 6, seed=3)
    log_pi, tau = log_pi_of(counts), 1.3
    _, g = grad_of(lambda x: R.logit_adjusted_cross_entropy(x, y, log_pi, tau, reduction="sum"), z)
    expected = torch.softmax(z + tau * log_pi, dim=1) - F.one_hot(y, 6).to(F64)
    assert_close(g, expected, rtol=1e-12, atol=1e-12)


def test_logit_adjustment_actually_depends_on_prior():
    z, y, counts = make_inputs(32, 5, seed=11)
    counts = torch.tensor([1000, 300, 100, 30, 3])
    a = R.logit_adjusted_cross_entropy(z, y, log_pi_of(counts), 1.0)
    b = F.cross_entropy(z, y)
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("N,C", [(1, 1), (5, 4), (64, 10), (3, 1000)])
def test_balanced_softmax_is_logit_adjustment_with_tau_one(N, C):
    z, y, counts = make_inputs(N, C, seed=N + 7 * C)
    log_pi = log_pi_of(counts)
    for reduction in ("mean", "sum", "none"):
        bs, g_bs = grad_of(lambda x, r: R.balanced_softmax_cross_entropy(x, y, log_pi, reduction=r),
                           z, reduction)
        la, g_la = grad_of(lambda x, r: R.logit_adjusted_cross_entropy(x, y, log_pi, 1.0, reduction=r),
                           z, reduction)
        exp = F.cross_entropy(z + log_pi, y, reduction=reduction)
        assert_close(bs, la, rtol=0, atol=0)
        assert_close(g_bs, g_la, rtol=0, atol=0)
        assert_close(bs, exp, rtol=1e-12, atol=1e-12)


def test_logit_adjusted_with_all_torch_options_matches_torch():
    """With a prior the adjustment is only an offset: every torch option must still coincide."""
    z, y, counts = make_inputs(40, 9, seed=5)
    y[::4] = -1
    w = torch.rand(9, generator=gen(6), dtype=F64) + 0.1
    log_pi, tau = log_pi_of(counts), 0.8
    for reduction, ls in itertools.product(("mean", "sum", "none"), (0.0, 0.25)):
        kw = dict(weight=w, ignore_index=-1, reduction=reduction, label_smoothing=ls)
        got, g_got = grad_of(lambda x, k: R.logit_adjusted_cross_entropy(x, y, log_pi, tau, **k), z, kw)
        exp, g_exp = grad_of(lambda x, k: F.cross_entropy(x + tau * log_pi, y, **k), z, kw)
        assert_close(got, exp, rtol=1e-12, atol=1e-12)
        assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(N=st.integers(1, 20), C=st.integers(1, 30), tau=st.floats(-3.0, 3.0), seed=st.integers(0, 2**31 - 1),
       reduction=st.sampled_from(["mean", "sum", "none"]), ls=st.sampled_from([0.0, 0.1, 0.9]))
def test_hypothesis_logit_adjusted_vs_torch(N, C, tau, seed, reduction, ls):
    z, y, counts = make_inputs(N, C, seed)
    log_pi = log_pi_of(counts)
    kw = dict(reduction=reduction, label_smoothing=ls)
    got, g_got = grad_of(lambda x: R.logit_adjusted_cross_entropy(x, y, log_pi, tau, **kw), z)
    exp, g_exp = grad_of(lambda x: F.cross_entropy(x + tau * log_pi, y, **kw), z)
    assert_close(got, exp, rtol=1e-10, atol=1e-10)
    assert_close(g_got, g_exp, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# LDAM
# ----------------------------------------------------------------------------------------------

def ldam_official(z, y, counts, max_m=0.5, s=30.0, weight=None, reduction="mean"):
    """LDAMLoss.forward of the official code (Cao et al.), in float64."""
    m_list = 1.0 / torch.sqrt(torch.sqrt(counts.to(F64)))
    m_list = m_list * (max_m / m_list.max())
    index = F.one_hot(y, z.shape[1]).bool()
    batch_m = m_list[y][:, None]
    out = torch.where(index, z - batch_m, z)
    return F.cross_entropy(s * out, y, weight=weight, reduction=reduction)


@pytest.mark.parametrize("N,C", SHAPES)
@pytest.mark.parametrize("max_m,s", [(0.5, 30.0), (0.3, 1.0), (1.0, 16.0)])
def test_ldam_matches_official_formula(N, C, max_m, s):
    z, y, counts = make_inputs(N, C, seed=31 * N + C, scale=0.3)
    m_list = 1.0 / counts.to(F64) ** 0.25
    margins = m_list * (max_m / m_list.max())
    for reduction in ("mean", "sum", "none"):
        got, g_got = grad_of(lambda x, r: R.ldam_cross_entropy(x, y, margins, s, reduction=r), z, reduction)
        exp, g_exp = grad_of(lambda x, r: ldam_official(x, y, counts, max_m, s, reduction=r), z, reduction)
        assert_close(got, exp, rtol=1e-11, atol=1e-11)
        assert_close(g_got, g_exp, rtol=1e-11, atol=1e-11)


def test_ldam_weighted_matches_official_formula():
    z, y, counts = make_inputs(50, 8, seed=8, scale=0.3)
    w = torch.rand(8, generator=gen(9), dtype=F64) + 0.2
    m_list = counts.to(F64) ** -0.25
    margins = m_list * (0.5 / m_list.max())
    got = R.ldam_cross_entropy(z, y, margins, 30.0, weight=w)
    exp = ldam_official(z, y, counts, 0.5, 30.0, weight=w)
    assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_margin_subtracted_at_the_target_only_and_exactly():
    """``a_ij - m_i [j = y_i]`` with one rounding, ignored rows untouched, in float32 and float64 (the reference
    subtracts it by a scatter, not by an (N, C) one-hot product); a margin beyond the dtype's range gives the
    target -inf, so an infinite loss and no NaN (the one-hot's ``inf * 0`` gave NaN in every class)."""
    for dtype in (torch.float32, F64):
        z = torch.randn(6, 5, generator=gen(10), dtype=dtype)
        y = torch.tensor([0, 4, -100, 2, 2, 1])
        m = torch.rand(5, generator=gen(11), dtype=dtype)
        a = R.adjusted_logits(z, y, margin=m)
        expected = z.clone()
        for i, t in enumerate(y.tolist()):
            if t != -100:
                expected[i, t] = z[i, t] - m[t]
        assert torch.equal(a, expected)
    z32 = torch.randn(6, 5, generator=gen(12))
    a = R.adjusted_logits(z32, y, margin=1e300)  # beyond float32: inf
    assert not a.isnan().any() and (a == -math.inf).sum() == 5
    loss = R.adjusted_cross_entropy(z32, y, margin=1e300, reduction="none")
    assert loss[2] == 0 and (loss[y != -100] == math.inf).all()


# ----------------------------------------------------------------------------------------------
# GCL
# ----------------------------------------------------------------------------------------------

def gcl_dense(cos, y, counts, noise, m, s, noise_mul, weight=None, reduction="mean"):
    """The official GCLLoss.forward with the noise ``noise`` (already |clamp(N(0,1/3))|) given."""
    n = counts.to(F64)
    delta = n.log().max() - n.log()
    c = cos - noise_mul * noise.to(F64) * delta / delta.max()
    c = c.clone()
    c[torch.arange(cos.shape[0]), y] -= m
    return F.cross_entropy(s * c, y, weight=weight, reduction=reduction)


GCL_HP = [(0.5, 30.0, 1.0), (0.0, 30.0, 0.5), (0.1, 20.0, 0.5), (0.3, 5.0, 2.0)]


@pytest.mark.parametrize("N,C", [(1, 2), (3, 7), (64, 10), (257, 7), (4, 1000)])
@pytest.mark.parametrize("m,s,noise_mul", GCL_HP)
def test_gcl_with_explicit_noise_matches_dense_formula(N, C, m, s, noise_mul):
    cos, y, counts = make_cosine(N, C, seed=N * 17 + C)
    noise = gcl_noise(1234 + N, N, C)
    cloud = cloud_of(counts)
    for reduction in ("mean", "sum", "none"):
        got, g_got = grad_of(lambda x, r: R.gcl_cross_entropy(x, y, cloud, m, s, noise_mul, noise=noise,
                                                              reduction=r), cos, reduction)
        exp, g_exp = grad_of(lambda x, r: gcl_dense(x, y, counts, noise, m, s, noise_mul, reduction=r),
                             cos, reduction)
        # loose enough for the float32 noise product (see the float64 precision test below)
        assert_close(got, exp, rtol=1e-5, atol=1e-5)
        assert_close(g_got, g_exp, rtol=1e-5, atol=1e-6)


def test_gcl_float64_reference_is_float64_exact():
    """The float64 reference is the oracle: the noise term must be computed in float64 too.

    Everything here is exactly representable (float32 noise, float64 logits and cloud), so the only
    difference to a dense float64 formula is the reference's own rounding.
    """
    cos, y, counts = make_cosine(37, 11, seed=0)
    noise = gcl_noise(123, 37, 11)
    cloud = cloud_of(counts)
    got = R.gcl_cross_entropy(cos, y, cloud, 0.5, 30.0, 1.0, noise=noise, reduction="none")
    exp = gcl_dense(cos, y, counts, noise, 0.5, 30.0, 1.0, reduction="none")
    assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_gcl_noise_really_enters():
    cos, y, counts = make_cosine(32, 6, seed=2)
    cloud = cloud_of(counts)
    with_noise = R.gcl_cross_entropy(cos, y, cloud, 0.5, 30.0, 1.0, noise=gcl_noise(5, 32, 6))
    without = R.gcl_cross_entropy(cos, y, cloud, 0.5, 30.0, 0.0)
    assert not torch.allclose(with_noise, without, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("N,C", [(1, 1), (5, 3), (100, 12)])
@pytest.mark.parametrize("m,s", [(0.5, 30.0), (0.1, 20.0), (0.0, 1.0)])
def test_gcl_without_noise_is_closed_form(N, C, m, s):
    """noise_mul = 0: CE(s * (cos - m * onehot(y)), y), whatever the seed and the cloud."""
    cos, y, counts = make_cosine(N, C, seed=100 + N + C)
    cloud = cloud_of(counts) if C > 1 else torch.zeros(1, dtype=F64)
    expected_logits = s * (cos - m * F.one_hot(y, C).to(F64))
    for reduction in ("mean", "sum", "none"):
        exp, g_exp = grad_of(lambda x, r: F.cross_entropy(s * (x - m * F.one_hot(y, C).to(F64)), y,
                                                          reduction=r), cos, reduction)
        for seed in (7, None):
            got, g_got = grad_of(lambda x, r, sd: R.gcl_cross_entropy(x, y, cloud, m, s, 0.0, seed=sd,
                                                                      reduction=r), cos, reduction, seed)
            assert_close(got, exp, rtol=1e-12, atol=1e-12)
            assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)
    assert_close(R.adjusted_logits(cos, y, margin=m, scale=s), expected_logits, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("gamma", [1.0, 2.0, 0.5])
def test_gcl_focal_factor_is_detached(gamma):
    N, C, m, s, noise_mul = 48, 9, 0.1, 20.0, 0.5
    cos, y, counts = make_cosine(N, C, seed=int(gamma * 10))
    noise = gcl_noise(99, N, C)

    def expected(x, reduction):
        ce = gcl_dense(x, y, counts, noise, m, s, noise_mul, reduction="none")
        p = torch.exp(-ce).detach()
        rows = (1 - p) ** gamma * ce
        return {"none": rows, "sum": rows.sum(), "mean": rows.mean()}[reduction]

    cloud = cloud_of(counts)
    for reduction in ("mean", "sum", "none"):
        got, g_got = grad_of(lambda x, r: R.gcl_cross_entropy(x, y, cloud, m, s, noise_mul, gamma,
                                                              noise=noise, reduction=r), cos, reduction)
        exp, g_exp = grad_of(expected, cos, reduction)
        assert_close(got, exp, rtol=1e-5, atol=1e-6)
        assert_close(g_got, g_exp, rtol=1e-5, atol=1e-6)

    # the un-detached focal loss has a different gradient: the test above can tell them apart
    def undetached(x):
        ce = gcl_dense(x, y, counts, noise, m, s, noise_mul, reduction="none")
        return ((1 - torch.exp(-ce)) ** gamma * ce).sum()

    _, g_undetached = grad_of(undetached, cos)
    _, g_sum = grad_of(lambda x: R.gcl_cross_entropy(x, y, cloud, m, s, noise_mul, gamma, noise=noise,
                                                     reduction="sum"), cos)
    assert not torch.allclose(g_sum, g_undetached, rtol=1e-3, atol=1e-4)


def test_gcl_unseeded_follows_torch_manual_seed():
    cos, y, counts = make_cosine(20, 13, seed=4)
    cloud = cloud_of(counts)
    torch.manual_seed(2024)
    a = R.gcl_cross_entropy(cos, y, cloud, reduction="none")
    torch.manual_seed(2024)
    seed = draw_seed()
    b = R.gcl_cross_entropy(cos, y, cloud, seed=seed, reduction="none")
    c = R.gcl_cross_entropy(cos, y, cloud, reduction="none")  # a fresh seed
    assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# LADE
# ----------------------------------------------------------------------------------------------

def lade_official(z, y, pi, alpha=0.1, remine_lambda=0.1, weight=None, reduction="mean", label_smoothing=0.0):
    """PriorCELoss + alpha * LADELoss of the official LADE code (dense C x N masks), float64."""
    N, C = z.shape
    masks = y == torch.arange(C)[:, None]  # C x N
    per_cls_pred_spread = z.T * masks  # C x N
    balanced_prior = torch.tensor(1.0 / C, dtype=F64)
    pred_spread = (z - torch.log(pi + 1e-9) + torch.log(balanced_prior + 1e-9)).T  # C x N
    num_samples_per_cls = masks.sum(-1).to(F64)
    first_term = per_cls_pred_spread.sum(-1) / (num_samples_per_cls + 1e-8)
    second_term = torch.logsumexp(pred_spread, -1) - math.log(N)
    estim = first_term - second_term - remine_lambda * second_term**2
    lade = -torch.sum(estim * pi)
    prior_ce = F.cross_entropy(z + torch.log(pi + 1e-9), y, weight=weight, reduction=reduction,
                               label_smoothing=label_smoothing)
    return prior_ce + alpha * lade


LADE_SHAPES = [(1, 1), (1, 5), (3, 7), (16, 10), (64, 4), (257, 13), (8, 50)]


@pytest.mark.parametrize("N,C", LADE_SHAPES)
@pytest.mark.parametrize("alpha,lam", [(0.1, 0.1), (1.0, 0.5), (0.5, 0.0)])
def test_lade_matches_official_dense_code(N, C, alpha, lam):
    z, y, counts = make_inputs(N, C, seed=N * 7 + C, absent=C // 2)
    pi = counts.to(F64) / counts.sum()
    if C > 1:
        assert not (y == C // 2).any()  # a class absent from the batch
    for reduction in ("mean", "sum"):
        got, g_got = grad_of(lambda x, r: R.lade_loss(x, y, pi, alpha, lam, reduction=r), z, reduction)
        exp, g_exp = grad_of(lambda x, r: lade_official(x, y, pi, alpha, lam, reduction=r), z, reduction)
        assert_close(got, exp, rtol=1e-10, atol=1e-10)
        assert_close(g_got, g_exp, rtol=1e-10, atol=1e-10)


def test_lade_with_weight_and_label_smoothing_matches_official():
    z, y, counts = make_inputs(30, 6, seed=12, absent=2)
    pi = counts.to(F64) / counts.sum()
    w = torch.rand(6, generator=gen(1), dtype=F64) + 0.1
    got, g_got = grad_of(lambda x: R.lade_loss(x, y, pi, 0.3, 0.2, weight=w, label_smoothing=0.2), z)
    exp, g_exp = grad_of(lambda x: lade_official(x, y, pi, 0.3, 0.2, weight=w, label_smoothing=0.2), z)
    assert_close(got, exp, rtol=1e-10, atol=1e-10)
    assert_close(g_got, g_exp, rtol=1e-10, atol=1e-10)


def test_lade_ignored_rows_are_dropped_from_both_terms():
    z, y, counts = make_inputs(40, 8, seed=13)
    pi = counts.to(F64) / counts.sum()
    y_ign = y.clone()
    y_ign[::3] = -100
    keep = y_ign != -100
    got, g_got = grad_of(lambda x: R.lade_loss(x, y_ign, pi, 0.2, 0.1), z)
    exp, g_exp_kept = grad_of(lambda x: lade_official(x, y[keep], pi, 0.2, 0.1), z[keep])
    assert_close(got, exp, rtol=1e-10, atol=1e-10)
    assert_close(g_got[keep], g_exp_kept, rtol=1e-10, atol=1e-10)
    assert torch.all(g_got[~keep] == 0)


def test_lade_regulariser_alone():
    z, y, counts = make_inputs(25, 6, seed=14, absent=0)
    pi = counts.to(F64) / counts.sum()
    lader = R.lader(z, y, pi, 0.3)
    expected = lade_official(z, y, pi, 1.0, 0.3) - F.cross_entropy(z + torch.log(pi + 1e-9), y)
    assert_close(lader, expected, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# gradcheck
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_adjusted_cross_entropy_all_flags(reduction):
    """gradcheck with every flag on except gamma: the focal factor is detached by definition, so its
    analytic gradient is *not* the numerical one; gamma's gradient is checked in the next test."""
    N, C = 7, 5
    g = gen(21)
    z = torch.randn(N, C, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g)
    y[2] = -100
    y[5] = -100
    prior = torch.log(torch.rand(C, generator=g, dtype=F64) + 0.1)
    cloud = torch.rand(C, generator=g, dtype=F64)
    margin = torch.rand(C, generator=g, dtype=F64) * 0.5
    weight = torch.rand(C, generator=g, dtype=F64) + 0.2

    def fn(x):
        return R.adjusted_cross_entropy(x, y, log_prior=prior, tau=0.7, cloud=cloud, noise_mul=0.8, seed=1234,
                                        margin=margin, scale=3.0, weight=weight, label_smoothing=0.15,
                                        reduction=reduction)

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_focal_gradient_with_all_flags_is_factor_times_plain_gradient():
    """gamma > 0: d loss_i = (1 - p_iy)^gamma * d loss_i(gamma=0), p_iy = softmax(a_i)_y a constant."""
    N, C, gamma = 9, 6, 1.5
    g = gen(22)
    z = torch.randn(N, C, generator=g, dtype=F64)
    y = torch.randint(0, C, (N,), generator=g)
    y[3] = -100
    kw = dict(log_prior=torch.log(torch.rand(C, generator=g, dtype=F64) + 0.1), tau=0.7,
              cloud=torch.rand(C, generator=g, dtype=F64), noise_mul=0.8, seed=77,
              margin=torch.rand(C, generator=g, dtype=F64) * 0.5, scale=3.0,
              weight=torch.rand(C, generator=g, dtype=F64) + 0.2, label_smoothing=0.1)
    a = R.adjusted_logits(z, y, log_prior=kw["log_prior"], tau=0.7, cloud=kw["cloud"], noise_mul=0.8, seed=77,
                          margin=kw["margin"], scale=3.0)
    safe_y = y.clamp(min=0)
    p_y = torch.softmax(a, dim=1).gather(1, safe_y[:, None])[:, 0]
    factor = torch.where(y >= 0, (1 - p_y) ** gamma, torch.zeros_like(p_y))
    grad_out = torch.randn(N, generator=g, dtype=F64)

    x1 = z.clone().requires_grad_(True)
    plain = R.adjusted_cross_entropy(x1, y, reduction="none", **kw)
    (g_plain,) = torch.autograd.grad(plain, x1, grad_out * factor)
    x2 = z.clone().requires_grad_(True)
    focal = R.adjusted_cross_entropy(x2, y, gamma=gamma, reduction="none", **kw)
    (g_focal,) = torch.autograd.grad(focal, x2, grad_out)
    assert_close(focal, factor * plain.detach(), rtol=1e-12, atol=1e-12)
    assert_close(g_focal, g_plain, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean"])
def test_gradcheck_lade_loss(reduction):
    N, C = 8, 5
    g = gen(23)
    z = torch.randn(N, C, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, C - 1, (N,), generator=g)  # class C-1 absent
    y[1] = -100
    pi = torch.rand(C, generator=g, dtype=F64) + 0.05
    pi = pi / pi.sum()
    w = torch.rand(C, generator=g, dtype=F64) + 0.2

    def fn(x):
        return R.lade_loss(x, y, pi, 0.4, 0.2, weight=w, label_smoothing=0.1, reduction=reduction)

    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# torch.nn.functional.cross_entropy semantics
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("ignore", ["none", "some", "all"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_plain_options_match_torch(reduction, use_weight, ignore, label_smoothing):
    N, C = 23, 6
    seed = zlib.crc32(repr((reduction, use_weight, ignore, label_smoothing)).encode())
    z, y, _ = make_inputs(N, C, seed=seed)
    if ignore == "some":
        y[::3] = -100
    elif ignore == "all":
        y[:] = -100
    w = (torch.rand(C, generator=gen(3), dtype=F64) + 0.1) if use_weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    got, g_got = grad_of(lambda x: R.adjusted_cross_entropy(x, y, **kw), z)
    exp, g_exp = grad_of(lambda x: F.cross_entropy(x, y, **kw), z)
    assert_close(got, exp, rtol=1e-12, atol=1e-12)
    assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)
    if ignore == "all":
        if reduction == "mean":
            assert torch.isnan(got)
        elif reduction == "sum":
            assert got.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_empty_batch_matches_torch(reduction, use_weight, label_smoothing):
    z = torch.zeros(0, 5, dtype=F64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    w = torch.rand(5, generator=gen(0), dtype=F64) if use_weight else None
    kw = dict(weight=w, reduction=reduction, label_smoothing=label_smoothing)
    got = R.adjusted_cross_entropy(z, y, **kw)
    exp = F.cross_entropy(z, y, **kw)
    assert got.shape == exp.shape
    assert_close(got, exp)
    if reduction == "mean":
        assert torch.isnan(got)
    if reduction == "sum":
        assert got.item() == 0.0
    got.sum().backward()
    assert z.grad.shape == (0, 5)


def test_custom_ignore_index_inside_the_class_range():
    z, y, _ = make_inputs(30, 5, seed=40)
    for reduction in ("mean", "sum", "none"):
        got = R.adjusted_cross_entropy(z, y, ignore_index=2, reduction=reduction)
        exp = F.cross_entropy(z, y, ignore_index=2, reduction=reduction)
        assert_close(got, exp, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tdtype", [torch.int32, torch.int16, torch.int8])
def test_narrow_integer_targets(tdtype):
    z, y, counts = make_inputs(30, 7, seed=41)
    y[::4] = -100
    log_pi = log_pi_of(counts)
    got = R.logit_adjusted_cross_entropy(z, y.to(tdtype), log_pi, 1.0, reduction="none")
    exp = F.cross_entropy(z + log_pi, y, reduction="none")
    assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_uint8_targets_above_127_are_not_mistaken_for_ignore_index():
    """uint8 targets are accepted; class 156 must not compare equal to ignore_index=-100 (which
    wraps to 156 when compared in uint8)."""
    C = 200
    z, _, _ = make_inputs(3, C, seed=42)
    y = torch.tensor([156, 3, 199])
    got = R.adjusted_cross_entropy(z, y.to(torch.uint8), reduction="none")
    exp = F.cross_entropy(z, y, reduction="none")
    assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_grad_output_not_one():
    z, y, counts = make_inputs(17, 9, seed=43)
    y[4] = -100
    log_pi = log_pi_of(counts)
    go = torch.randn(17, generator=gen(44), dtype=F64)
    x1 = z.clone().requires_grad_(True)
    x2 = z.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(R.logit_adjusted_cross_entropy(x1, y, log_pi, 1.1, reduction="none"), x1, go)
    (g2,) = torch.autograd.grad(F.cross_entropy(x2 + 1.1 * log_pi, y, reduction="none"), x2, go)
    assert_close(g1, g2, rtol=1e-12, atol=1e-12)
    x1.grad = None
    (g3,) = torch.autograd.grad(R.logit_adjusted_cross_entropy(x1, y, log_pi, 1.1) * 3.5, x1)
    (g4,) = torch.autograd.grad(F.cross_entropy(x2 + 1.1 * log_pi, y) * 3.5, x2)
    assert_close(g3, g4, rtol=1e-12, atol=1e-12)


def test_peaked_logits():
    """Confident rows (huge logit gaps) stay finite and exact."""
    z, y, counts = make_inputs(64, 11, seed=45, scale=200.0)
    z[torch.arange(32), y[:32]] += 1000.0  # half the rows: target wins by a mile
    z[32 + torch.arange(32), (y[32:] + 1) % 11] += 1000.0  # the rest: a wrong class wins
    log_pi = log_pi_of(counts)
    got, g_got = grad_of(lambda x: R.logit_adjusted_cross_entropy(x, y, log_pi, 1.0, reduction="none"), z)
    exp, g_exp = grad_of(lambda x: F.cross_entropy(x + log_pi, y, reduction="none"), z)
    assert torch.isfinite(got).all() and torch.isfinite(g_got).all()
    assert_close(got, exp, rtol=1e-12, atol=1e-12)
    assert_close(g_got, g_exp, rtol=1e-12, atol=1e-12)


def test_non_contiguous_logits():
    g = gen(46)
    base = torch.randn(13, 40, generator=g, dtype=F64)
    y = torch.randint(0, 20, (13,), generator=g)
    counts = torch.randint(1, 100, (20,), generator=g)
    log_pi = log_pi_of(counts)
    for z in (base[:, ::2], base.t().contiguous().t()[:, :20], base[:, 5:25]):
        assert not z.is_contiguous()
        got = R.logit_adjusted_cross_entropy(z, y, log_pi, 0.9, reduction="none")
        exp = F.cross_entropy(z.contiguous() + 0.9 * log_pi, y, reduction="none")
        assert_close(got, exp, rtol=1e-12, atol=1e-12)
        got_lade = R.lade_loss(z, y, log_pi.exp(), 0.5, 0.1)
        exp_lade = lade_official(z.contiguous(), y, log_pi.exp(), 0.5, 0.1)
        assert_close(got_lade, exp_lade, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# dtypes
# ----------------------------------------------------------------------------------------------

# (rtol, atol) per dtype, relative to the loss's own scale (s for LDAM/GCL)
TOL = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 4e-2}


def _dtype_cases(C):
    counts = torch.randint(1, 1000, (C,), generator=gen(C))
    log_pi = log_pi_of(counts)
    m_list = counts.to(F64) ** -0.25
    margins = m_list * (0.5 / m_list.max())
    cloud = cloud_of(counts)
    pi = counts.to(F64) / counts.sum()
    return {
        "la": (1.0, lambda x, y, dt: R.logit_adjusted_cross_entropy(x, y, log_pi.to(dt), 1.0,
                                                                    reduction="none")),
        "ldam": (30.0, lambda x, y, dt: R.ldam_cross_entropy(x * 0.1, y, margins.to(dt), 30.0,
                                                             reduction="none")),
        "gcl": (30.0, lambda x, y, dt: R.gcl_cross_entropy(x.clamp(-1, 1), y, cloud.to(dt), 0.5, 30.0, 1.0,
                                                           seed=5, reduction="none")),
        "lade": (1.0, lambda x, y, dt: R.lade_loss(x, y, pi.to(dt), 0.1, 0.1).reshape(1)),
        "focal": (1.0, lambda x, y, dt: R.adjusted_cross_entropy(x, y, log_prior=log_pi.to(dt), gamma=2.0,
                                                                 label_smoothing=0.1, reduction="none")),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["la", "ldam", "gcl", "lade", "focal"])
def test_low_precision_close_to_float64(dtype, loss):
    N, C = 33, 12
    g = gen(50)
    z = (torch.randn(N, C, generator=g, dtype=F64) * 2).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    y[:C] = torch.arange(C)  # every class present (an absent class in float16 LADE: see below)
    y[20] = -100
    scale, fn = _dtype_cases(C)[loss]
    x_lo = z.clone().requires_grad_(True)
    out_lo = fn(x_lo, y, dtype)
    assert out_lo.dtype == dtype
    out_lo.sum().backward()
    assert x_lo.grad.dtype == dtype
    x_hi = z.to(F64).requires_grad_(True)
    out_hi = fn(x_hi, y, F64)
    out_hi.sum().backward()
    tol = TOL[dtype]
    assert_close(out_lo.to(F64), out_hi.detach(), rtol=tol, atol=tol * scale)
    assert_close(x_lo.grad.to(F64), x_hi.grad, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lade_low_precision_with_a_class_absent_from_the_batch(dtype):
    """A class absent from the batch has first_c = 0 / (0 + 1e-8); in float16 1e-8 rounds to 0, so
    the statistic must not be computed as 0/0 in the logits' dtype."""
    g = gen(51)
    N, C = 24, 10
    z = (torch.randn(N, C, generator=g, dtype=F64) * 2).to(dtype)
    y = torch.randint(0, C - 2, (N,), generator=g)  # classes C-2, C-1 absent
    pi = torch.rand(C, generator=g, dtype=F64) + 0.05
    pi = pi / pi.sum()
    x = z.clone().requires_grad_(True)
    out = R.lade_loss(x, y, pi.to(dtype), 0.1, 0.1)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all()
    exp = lade_official(z.to(F64), y, pi.to(dtype).to(F64), 0.1, 0.1)
    tol = TOL[dtype]
    assert_close(out.to(F64), exp, rtol=tol, atol=tol)


def test_int32_targets_with_an_ignore_index_beyond_int32():
    """int32 targets are compared with ignore_index in int64: 2^32 must not wrap to class 0 (torch's own cross
    entropy on int64 targets ignores nothing here)."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    want = torch.nn.functional.cross_entropy(z, y, reduction="none")
    for ignore in (2**32, -(2**32) - 100):
        got = R.adjusted_cross_entropy(z, y.to(torch.int32), ignore_index=ignore, reduction="none")
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_half_margin_beyond_the_dtype_range_is_inf_not_an_error():
    z = torch.randn(3, 4).half()
    y = torch.tensor([0, 1, 2])
    loss = R.adjusted_cross_entropy(z, y, margin=1e5, reduction="none")  # the margin is inf in float16
    assert loss.dtype == torch.float16


def test_lader_phases_and_a_batch_without_valid_rows():
    """``lader`` is ``lader_from_statistics(lader_statistics(...))``; with every row ignored LADER is 0 and its
    gradient 0, not NaN (a data-parallel rank can hold such a batch)."""
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, -100, 3, 3, 4])
    pi = torch.softmax(torch.randn(5, generator=gen, dtype=torch.float64), 0)
    stats = R.lader_statistics(z, y)
    assert torch.equal(R.lader_from_statistics(stats, pi, 0.1), R.lader(z, y, pi, 0.1))
    assert stats.valid.item() == 5 and stats.count.tolist() == [1, 1, 0, 2, 1]
    empty = R.lader(z, torch.full((6,), -100), pi, 0.1)
    empty.backward()
    assert empty.item() == 0 and torch.equal(z.grad, torch.zeros_like(z))


def test_probability_targets_against_an_independent_formula():
    """Class probabilities: at tau = 0 F.cross_entropy's (weights, smoothing, every reduction, unbatched); at
    tau != 0 with margins, scale and the focal factor, the formula written out; a one-hot target is the
    class-index loss."""
    gen = torch.Generator().manual_seed(12)
    N, C = 7, 6
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(N, C, generator=gen, dtype=torch.float64) * 2, 1)
    w = torch.rand(C, generator=gen, dtype=torch.float64) + 0.5
    lp = torch.log_softmax(torch.randn(C, generator=gen, dtype=torch.float64), 0)
    m = torch.rand(C, generator=gen, dtype=torch.float64) * 0.4
    for reduction in ("mean", "sum", "none"):
        got = R.adjusted_cross_entropy(z, q, weight=w, label_smoothing=0.2, reduction=reduction)
        torch.testing.assert_close(got, F.cross_entropy(z, q, weight=w, label_smoothing=0.2, reduction=reduction))
    torch.testing.assert_close(R.adjusted_cross_entropy(z[0], q[0]), F.cross_entropy(z[0], q[0]))
    eps, s, tau, gamma = 0.1, 3.0, 0.7, 2.0
    a = s * (z + tau * lp - m * q)
    logp = torch.log_softmax(a, 1)
    q_eps = (1 - eps) * q + eps / C
    focal = (1 - (q * logp.exp()).sum(1)) ** gamma
    want = (focal * -(w * q_eps * logp).sum(1)).mean()
    got = R.adjusted_cross_entropy(z, q, log_prior=lp, tau=tau, margin=m, scale=s, gamma=gamma, weight=w,
                                   label_smoothing=eps)
    torch.testing.assert_close(got, want)
    y = torch.randint(0, C, (N,), generator=gen)
    onehot = F.one_hot(y, C).double()
    kw = dict(log_prior=lp, tau=tau, margin=m, scale=s, gamma=gamma, weight=w, label_smoothing=eps, reduction="none")
    torch.testing.assert_close(R.adjusted_cross_entropy(z, onehot, **kw), R.adjusted_cross_entropy(z, y, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lade_half_precision_prior_takes_its_log_in_float32(dtype):
    """``lade_loss`` with a half-precision prior: log(pi) in at least float32, as the kernels take it (the log in
    bfloat16 moved the loss by ~3e-3 at C = 40 against the float64 loss of the same rounded prior; the kernels
    ~4e-7)."""
    g = gen(52)
    C = 40
    z = torch.randn(16, C, generator=g, dtype=F64)
    y = torch.randint(0, C, (16,), generator=g)
    pi = prior(torch.randint(1, 5000, (C,), generator=g)).to(dtype)
    exact = R.lade_loss(z, y, pi.to(F64))
    assert_close(R.lade_loss(z.float(), y, pi).to(F64), exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_half_rows_are_summed_in_float32(reduction):
    """The batch sum of 16-bit rows is taken in float32 (as the kernels and CUDA's F.cross_entropy take it): 8 rows
    of ~1e4 sum past fp16's 65504, yet their mean is ~1e4, not the inf of an fp16 sum (CPU PyTorch's)."""
    z = torch.zeros(8, 5)
    z[:, 0] = -1e4
    z = z.half()
    y = torch.zeros(8, dtype=torch.long)
    got = R.adjusted_cross_entropy(z, y, reduction=reduction)
    rows = F.cross_entropy(z.double(), y, reduction="none")
    want = (rows.mean() if reduction == "mean" else rows.sum()).half()
    assert got.dtype == torch.float16
    assert torch.isfinite(got) == (reduction == "mean")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("offset, dtype", [(300.0, torch.bfloat16), (1000.0, torch.bfloat16),
                                           (2000.0, torch.float16), (6e4, torch.float16)])
def test_sixteen_bit_logits_are_computed_in_float32(offset, dtype):
    """16-bit logits with a large common offset plus a prior offset: summed in their own dtype (bfloat16 near 300:
    2 apart) the offset lost its precision (bf16 at 300: 5.31 for 5.144), and fp16 near 6e4 lost the prior whole
    (log C). The reference computes in float32 and rounds the loss once: within one rounding of the float64 loss.
    LADE likewise, where LADER alone passes fp16's largest value (inf before alpha scaled it)."""
    g = gen(7)
    log_prior = torch.log_softmax(torch.randn(10, generator=g, dtype=F64) * 2, 0)
    y = torch.randint(0, 10, (8,), generator=g)
    z = (offset + torch.randn(8, 10, generator=g, dtype=F64)).to(dtype)
    want = F.cross_entropy(z.double() + log_prior, y)
    got = R.logit_adjusted_cross_entropy(z, y, log_prior)
    assert got.dtype == dtype
    assert abs(got.double() - want) <= torch.finfo(dtype).eps * abs(want)
    if dtype == torch.float16:
        z = (1e3 + torch.randn(6, 7, generator=g, dtype=F64)).half()
        pi = torch.softmax(torch.randn(7, generator=g, dtype=F64), 0)
        y = torch.tensor([0, 3, 5, 2, 3, 6])
        want = R.lade_loss(z.double(), y, pi)
        got = R.lade_loss(z, y, pi)
        assert 1e4 < want < 6e4 and abs(got.double() - want) <= torch.finfo(dtype).eps * want
