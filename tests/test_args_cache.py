"""The kernels' arguments reused between calls with the same fields (:class:`fastlt._operator.ArgsCache`): reused
only while every tensor is the same object, unchanged, and every scalar equal; the loss always that of the values
passed (the kernels in the interpreter without a GPU)."""

import torch
from conftest import DEVICE

import fastlt
from fastlt import _glue
from fastlt import functional as LF
from fastlt import reference as R

F64 = torch.float64


def _data(C=11, N=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    lp = torch.log_softmax(torch.randn(C, generator=gen), 0).to(DEVICE)
    return z, y, lp


def _want(z, y, **kw):
    return R.adjusted_cross_entropy(z.cpu().double(), y.cpu(), **{k: (v.cpu().double() if isinstance(v, torch.Tensor)
                                                                       else v) for k, v in kw.items()})


def test_reused_while_the_fields_are_the_same_and_rebuilt_when_they_change():
    z, y, lp = _data()
    LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.5, backend="triton")
    first = _glue._LAST_ARGS._args
    loss = LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.5, backend="triton")
    assert _glue._LAST_ARGS._args is first  # the same tensors, unchanged: reused
    torch.testing.assert_close(loss.cpu().double(), _want(z, y, log_prior=lp, tau=0.5), rtol=1e-5, atol=1e-5)
    lp.mul_(3.0)  # in place: a new version
    loss = LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.5, backend="triton")
    assert _glue._LAST_ARGS._args is not first
    torch.testing.assert_close(loss.cpu().double(), _want(z, y, log_prior=lp, tau=0.5), rtol=1e-5, atol=1e-5)
    second = _glue._LAST_ARGS._args
    loss = LF.adjusted_cross_entropy(z, y, log_prior=lp, tau=0.25, backend="triton")  # another scalar
    assert _glue._LAST_ARGS._args is not second
    torch.testing.assert_close(loss.cpu().double(), _want(z, y, log_prior=lp, tau=0.25), rtol=1e-5, atol=1e-5)
    third = _glue._LAST_ARGS._args
    other = lp.clone()  # equal values, another tensor
    LF.adjusted_cross_entropy(z, y, log_prior=other, tau=0.25, backend="triton")
    assert _glue._LAST_ARGS._args is not third
    z_wide, y_wide, lp_wide = _data(C=13)  # another class count
    loss = LF.adjusted_cross_entropy(z_wide, y_wide, log_prior=lp_wide, tau=0.25, backend="triton")
    torch.testing.assert_close(loss.cpu().double(), _want(z_wide, y_wide, log_prior=lp_wide, tau=0.25), rtol=1e-5,
                               atol=1e-5)


def test_a_module_and_a_temporary_vector_each_step():
    """A module's buffers make every later step a hit; a vector rebuilt each step (its id may be reused once freed)
    is never mistaken for the last one, since the cache keeps the last one alive."""
    z, y, _ = _data()
    counts = torch.arange(1, 12)
    crit = fastlt.LogitAdjustedLoss(counts, tau=0.7, backend="triton").to(DEVICE)
    want = R.logit_adjusted_cross_entropy(z.cpu().double(), y.cpu(), torch.log(fastlt.priors.prior(counts)).double(),
                                          0.7)
    for _ in range(3):
        torch.testing.assert_close(crit(z, y).cpu().double(), want, rtol=1e-5, atol=1e-5)
    for k in range(4):
        lp = torch.full((11,), -float(k), device=DEVICE)  # a new tensor every step, other values
        got = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
        torch.testing.assert_close(got.cpu().double(), R.logit_adjusted_cross_entropy(
            z.cpu().double(), y.cpu(), lp.cpu().double()), rtol=1e-5, atol=1e-5)


def test_drawn_seeds_are_drawn_on_every_call_as_the_reference_draws_them():
    z, y, _ = _data()
    counts = torch.arange(1, 12)
    crit = fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=1.0, backend="triton").to(DEVICE)
    ref = fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=1.0, backend="torch")
    torch.manual_seed(5)
    got = [crit(z, y) for _ in range(3)]
    torch.manual_seed(5)
    want = [ref(z.cpu(), y.cpu()) for _ in range(3)]
    assert len({float(g) for g in got}) == 3  # fresh noise each call
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)


def test_inference_tensors_are_not_cached():
    z, y, _ = _data()
    with torch.inference_mode():
        lp = torch.zeros(11, device=DEVICE)
        a = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
        b = LF.logit_adjusted_cross_entropy(z, y, lp, backend="triton")
    torch.testing.assert_close(a, b)
    assert _glue._LAST_ARGS._key is None
