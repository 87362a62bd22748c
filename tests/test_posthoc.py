"""fastlt.posthoc: post-hoc logit adjustment, PC Softmax, tau-normalisation, adjusted predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastlt.posthoc import logit_adjust, pc_softmax, predict, tau_normalize

COUNTS = [500, 120, 40, 9, 1]


def _logits(n=7, c=5, dtype=torch.float64, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _log_pi(counts):
    n = np.asarray(counts, dtype=np.float64)
    return torch.from_numpy(np.log(n / n.sum()))


# ----------------------------------------------------------------------------- logit_adjust


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_logit_adjust_formula(tau):
    z = _logits()
    got = logit_adjust(z, COUNTS, tau)
    expected = z - tau * _log_pi(COUNTS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


def test_logit_adjust_hand_value():
    # log(3/4) = -0.28768, log(1/4) = -1.38629
    got = logit_adjust(torch.tensor([[0.0, 0.0]], dtype=torch.float64), [3, 1], tau=1.0)
    expected = torch.tensor([[0.2876820724517809, 1.3862943611198906]], dtype=torch.float64)
    torch.testing.assert_close(got, expected)


def test_logit_adjust_count_types_and_log_prior_agree():
    z = _logits()
    ref = logit_adjust(z, COUNTS, 1.5)
    for counts in (np.array(COUNTS), torch.tensor(COUNTS), torch.tensor(COUNTS, dtype=torch.float32)):
        torch.testing.assert_close(logit_adjust(z, counts, 1.5), ref, rtol=0, atol=0)
    torch.testing.assert_close(logit_adjust(z, tau=1.5, log_prior=_log_pi(COUNTS)), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_logit_adjust_keeps_dtype_and_rounds_once(dtype):
    """The float64 log prior and the logits' difference is rounded once to the logits' dtype (half logits were
    rounded twice: the offset to fp16/bf16 first, ~1/3 of the entries one ulp off)."""
    z = _logits(dtype=dtype, n=64)
    for got in (logit_adjust(z, COUNTS, 1.0), logit_adjust(z, log_prior=_log_pi(COUNTS))):
        assert got.dtype == dtype
        if dtype == torch.float32:  # float32 arithmetic on the rounded offset, as torch's ops
            expected = z - _log_pi(COUNTS).float()
        else:  # log pi in float64, the difference rounded once (through float32: exact enough for halves)
            expected = (z.double() - _log_pi(COUNTS)).to(dtype)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_logit_adjust_gradient_is_identity():
    z = _logits().requires_grad_()
    out = logit_adjust(z, COUNTS)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(z.grad, g)


def test_logit_adjust_count_smoothing():
    z = _logits(c=3)
    with pytest.raises(ValueError, match="count_smoothing"):
        logit_adjust(z, [10, 0, 5])
    got = logit_adjust(z, [10, 0, 5], count_smoothing=0.5)
    torch.testing.assert_close(got, z - _log_pi([10.5, 0.5, 5.5]), rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((_logits(), COUNTS), {"log_prior": _log_pi(COUNTS)}, ValueError, "class_counts and log_prior"),
        ((_logits(),), {}, ValueError, "class_counts and log_prior"),
        ((_logits(c=4), COUNTS), {}, ValueError, "class_counts"),
        ((_logits(), [5, 4, 3, -1, 2]), {}, ValueError, "class_counts"),
        ((_logits(), [5.5, 4, 3, 1, 2]), {}, TypeError, "class_counts"),
        ((_logits(), COUNTS, float("nan")), {}, ValueError, "tau"),
        ((_logits(), COUNTS, "1"), {}, TypeError, "tau"),
        ((_logits(), COUNTS), {"count_smoothing": -1.0}, ValueError, "count_smoothing"),
        ((_logits()[0], COUNTS), {}, ValueError, "logits"),
        ((_logits().long(), COUNTS), {}, TypeError, "logits"),
        ((np.zeros((2, 5)), COUNTS), {}, TypeError, "logits"),
        ((_logits(),), {"log_prior": _log_pi(COUNTS)[:4]}, ValueError, "log_prior"),
        ((_logits(),), {"log_prior": torch.zeros(5, dtype=torch.long)}, TypeError, "log_prior"),
        ((_logits(),), {"log_prior": torch.tensor([0.0, -1, -2, -3, -math.inf])}, ValueError, "log_prior"),
        ((_logits(),), {"log_prior": [0.0] * 5}, TypeError, "log_prior"),
    ],
)
def test_logit_adjust_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        logit_adjust(*args, **kwargs)


# ----------------------------------------------------------------------------- pc_softmax


def test_pc_softmax_formula_with_target_prior():
    z = _logits()
    p_t = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15], dtype=torch.float64)
    got = pc_softmax(z, COUNTS, p_t)
    expected = torch.softmax(z - _log_pi(COUNTS) + p_t.log(), dim=1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(got.sum(1), torch.ones(7, dtype=torch.float64))
    # sequences and numpy arrays are accepted for the target prior
    torch.testing.assert_close(pc_softmax(z, COUNTS, p_t.tolist()), got, rtol=0, atol=0)
    torch.testing.assert_close(pc_softmax(z, COUNTS, p_t.numpy()), got, rtol=0, atol=0)


def test_pc_softmax_uniform_is_softmax_of_logit_adjust():
    z = _logits()
    expected = torch.softmax(logit_adjust(z, COUNTS, tau=1.0), dim=1)
    torch.testing.assert_close(pc_softmax(z, COUNTS), expected, rtol=0, atol=1e-14)
    torch.testing.assert_close(pc_softmax(z, COUNTS, [0.2] * 5), expected, rtol=0, atol=1e-14)


def test_pc_softmax_with_source_prior_is_plain_softmax():
    z = _logits()
    p_s = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    torch.testing.assert_close(pc_softmax(z, COUNTS, p_s), torch.softmax(z, 1), rtol=0, atol=1e-14)


def test_pc_softmax_zero_target_class_gets_zero_probability():
    got = pc_softmax(_logits(), COUNTS, [0.5, 0.5, 0.0, 0.0, 0.0])
    assert bool((got[:, 2:] == 0).all())
    torch.testing.assert_close(got.sum(1), torch.ones(7, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pc_softmax_dtype(dtype):
    z = _logits(dtype=dtype)
    got = pc_softmax(z, COUNTS)
    assert got.dtype == dtype
    expected = torch.softmax(z.double() - _log_pi(COUNTS), dim=1).to(dtype)
    torch.testing.assert_close(got, expected, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "match"),
    [
        ((_logits(), COUNTS, [0.2] * 4), {}, ValueError, "target_prior"),
        ((_logits(), COUNTS, [0.3] * 5), {}, ValueError, "target_prior must sum to 1"),
        ((_logits(), COUNTS, [0.6, 0.6, -0.2, 0.0, 0.0]), {}, ValueError, "non-negative"),
        ((_logits(), COUNTS, [0.2, 0.2, 0.2, 0.2, float("nan")]), {}, ValueError, "target_prior"),
        ((_logits(), COUNTS, "uniform"), {}, TypeError, "target_prior"),
        ((_logits(), COUNTS[:4]), {}, ValueError, "source_counts"),
        ((_logits(), [5, 0, 3, 1, 2]), {}, ValueError, "source_counts"),
        ((_logits(), [[5, 4, 3, 1, 2]]), {}, ValueError, "source_counts"),
        ((_logits()[0], COUNTS), {}, ValueError, "logits"),
    ],
)
def test_pc_softmax_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        pc_softmax(*args, **kwargs)


def test_pc_softmax_prior_sum_tolerance():
    p = [0.2] * 5
    p[0] += 5e-4  # inside 1e-3
    pc_softmax(_logits(), COUNTS, p)
    p[0] += 1e-3  # outside
    with pytest.raises(ValueError, match="target_prior"):
        pc_softmax(_logits(), COUNTS, p)


def test_pc_softmax_takes_a_float32_softmax_over_a_million_classes():
    """A target prior made by a float32 softmax over 10^6 classes sums to 1 only within ~1e-4; it is accepted, and
    the result is the float64 formula's (the prior's scale cancels in the softmax)."""
    C = 1_000_000
    gen = torch.Generator().manual_seed(0)
    p_t = torch.softmax(torch.randn(C, generator=gen), 0)
    assert abs(float(p_t.double().sum()) - 1.0) > 1e-6  # what the former 1e-6 check rejected
    counts = torch.randint(1, 1000, (C,), generator=gen)
    z = torch.randn(2, C, generator=gen, dtype=torch.float64)
    got = pc_softmax(z, counts, p_t)
    c = counts.double()
    expected = torch.softmax(z - (c / c.sum()).log() + p_t.double().log(), 1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-15)


# ----------------------------------------------------------------------------- tau_normalize


def test_tau_normalize_unit_rows_for_tau_one():
    w = _logits(n=6, c=11)
    got = tau_normalize(w, 1.0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(got, w / w.norm(dim=1, keepdim=True), rtol=0, atol=1e-15)


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.5])
def test_tau_normalize_norms_follow_power_law(tau):
    w = _logits(n=6, c=11) * torch.arange(1, 7, dtype=torch.float64)[:, None]
    got = tau_normalize(w, tau)
    norms = w.norm(dim=1)
    torch.testing.assert_close(got.norm(dim=1), norms.pow(1.0 - tau))
    # Kang et al.: w / |w|^tau, same direction
    torch.testing.assert_close(got, w / norms.pow(tau)[:, None])


def test_tau_normalize_tau_zero_returns_copy():
    w = _logits(n=3, c=4)
    got = tau_normalize(w, 0.0)
    torch.testing.assert_close(got, w, rtol=0, atol=0)
    got[0, 0] = 123.0
    assert w[0, 0] != 123.0


def test_tau_normalize_zero_row_and_dtype():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    got = tau_normalize(w, 1.0)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), torch.tensor([[0.6, 0.8], [0.0, 0.0]]), rtol=1e-2, atol=0)


def test_tau_normalize_gradient_flows():
    w = _logits(n=3, c=4).requires_grad_()
    tau_normalize(w, 1.0).sum().backward()
    assert w.grad is not None and bool(torch.isfinite(w.grad).all()) and float(w.grad.abs().sum()) > 0


@pytest.mark.parametrize(
    ("weight", "kwargs", "exc", "match"),
    [
        (torch.ones(4), {}, ValueError, "weight"),
        (torch.ones(2, 3, 4), {}, ValueError, "weight"),
        (torch.ones(2, 3, dtype=torch.long), {}, TypeError, "weight"),
        (np.ones((2, 3)), {}, TypeError, "weight"),
        (torch.ones(2, 3), {"tau": -0.5}, ValueError, "tau"),
        (torch.ones(2, 3), {"tau": float("inf")}, ValueError, "tau"),
        (torch.ones(2, 3), {"eps": 0.0}, ValueError, "eps"),
        (torch.ones(2, 3), {"eps": None}, TypeError, "eps"),
    ],
)
def test_tau_normalize_errors(weight, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tau_normalize(weight, **kwargs)


# ----------------------------------------------------------------------------- predict


def test_predict_flips_toward_tail():
    z = torch.tensor([[2.0, 1.5], [4.0, 1.0]])
    counts = [90, 10]  # log pi = [-0.105, -2.303]: adjusted row 0 = [2.105, 3.803]
    assert predict(z, counts).tolist() == [1, 0]
    assert predict(z, counts, tau=0.0).tolist() == [0, 0]
    assert predict(z, counts).dtype == torch.int64


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    counts=st.lists(st.integers(1, 10_000), min_size=1, max_size=12),
    tau=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_predict_is_argmax_of_adjusted_and_of_pc_softmax(n, counts, tau, seed):
    z = _logits(n=n, c=len(counts), seed=seed)
    adjusted = z - tau * _log_pi(counts)
    assert torch.equal(predict(z, counts, tau), adjusted.argmax(1))
    probs = pc_softmax(z, counts)
    torch.testing.assert_close(probs.sum(1), torch.ones(n, dtype=torch.float64))
    assert torch.equal(probs.argmax(1), predict(z, counts, 1.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_predict_of_half_precision_logits_is_the_exact_argmax(dtype):
    """Half-precision logits (an autocast eval) are adjusted in float32: adjusted in bfloat16, 150 of these 4096
    predictions were another class than ``argmax_j (z_ij - log pi_j)`` computed exactly from the same logits."""
    gen = torch.Generator().manual_seed(0)
    C = 1000
    counts = torch.floor(1000.0 * torch.pow(1000.0, -torch.arange(C) / (C - 1))).clamp(min=1)
    z = (torch.randn(4096, C, generator=gen) * 3 + 8).to(dtype)
    exact = (z.double() - torch.log(counts.double() / counts.sum())).argmax(1)
    assert torch.equal(predict(z, counts), exact)


def test_predict_errors():
    with pytest.raises(ValueError, match="class_counts"):
        predict(_logits(), COUNTS[:3])
    with pytest.raises(ValueError, match="tau"):
        predict(_logits(), COUNTS, tau=float("nan"))


def test_reversed_numpy_counts_and_a_bool_target_prior():
    """A reversed numpy array (np.flip, [::-1]: a negative stride, which torch.as_tensor refuses) is taken as any
    array; a bool target prior is refused (it was read as a one-hot prior)."""
    counts = np.array([1, 10, 100, 1000])[::-1]
    z = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(logit_adjust(z, counts), logit_adjust(z, counts.copy()))
    prior = np.array([0.1, 0.2, 0.3, 0.4])[::-1]
    torch.testing.assert_close(pc_softmax(z, counts, prior), pc_softmax(z, counts, prior.copy()))
    with pytest.raises(TypeError, match="target_prior must hold real probabilities"):
        pc_softmax(z, counts, torch.tensor([True, False, False, False]))
