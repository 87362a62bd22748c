"""The loss modules (fastlt.losses) against the reference path: every option, hyperparameters as attributes,
backends, backward into a model; CPU only."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import fastlt
from fastlt import functional as LF
from fastlt import priors as P
from fastlt import reference as R

F64 = torch.float64


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gen(seed):
    return torch.Generator().manual_seed(seed)


def inputs(N=24, C=7, seed=0, dtype=torch.float32, cosine=False):
    g = gen(seed)
    if cosine:
        z = torch.rand(N, C, generator=g, dtype=F64) * 2 - 1
    else:
        z = torch.randn(N, C, generator=g, dtype=F64) * 2
    y = torch.randint(0, C, (N,), generator=g)
    counts = torch.randint(1, 1000, (C,), generator=g)
    counts[0] = 3000
    return z.to(dtype), y, counts


def grad_of(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    return out.detach(), g


def close(a, b, tol=1e-6):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, equal_nan=True)


OPTIONS = [
    dict(),
    dict(reduction="sum"),
    dict(reduction="none", label_smoothing=0.1),
    dict(weight=[0.5, 1.0, 2.0, 1.5, 0.7, 1.1, 0.9], ignore_index=3, label_smoothing=0.2),
]


def _weight_kw(opts):
    kw = {k: v for k, v in opts.items()}
    if "weight" in kw:
        kw["weight"] = torch.tensor(kw["weight"])
    return kw


@pytest.mark.parametrize("opts", OPTIONS)
def test_logit_adjusted_module_equals_reference(opts):
    z, y, counts = inputs(seed=1)
    loss = fastlt.LogitAdjustedLoss(counts, tau=1.4, **opts)
    kw = _weight_kw(opts)
    log_pi = P.log_prior(counts)
    got, g_got = grad_of(lambda x: loss(x, y), z)
    exp, g_exp = grad_of(lambda x: R.logit_adjusted_cross_entropy(x, y, log_pi, 1.4, **kw), z)
    close(got, exp)
    close(g_got, g_exp)
    # and independently: CE on the shifted logits
    torch_kw = dict(kw)
    close(got, F.cross_entropy(z + 1.4 * log_pi, y, **torch_kw), 1e-5)


@pytest.mark.parametrize("opts", OPTIONS)
def test_balanced_softmax_module_equals_reference(opts):
    z, y, counts = inputs(seed=2)
    loss = fastlt.BalancedSoftmaxLoss(counts, **opts)
    assert loss.tau == 1.0
    kw = _weight_kw(opts)
    got, g_got = grad_of(lambda x: loss(x, y), z)
    exp, g_exp = grad_of(lambda x: R.balanced_softmax_cross_entropy(x, y, P.log_prior(counts), **kw), z)
    close(got, exp)
    close(g_got, g_exp)


@pytest.mark.parametrize("opts", OPTIONS)
def test_ldam_module_equals_reference(opts):
    z, y, counts = inputs(seed=3)
    z = z * 0.2
    loss = fastlt.LDAMLoss(counts, max_margin=0.4, s=20.0, **opts)
    kw = _weight_kw(opts)
    got, g_got = grad_of(lambda x: loss(x, y), z)
    exp, g_exp = grad_of(lambda x: R.ldam_cross_entropy(x, y, P.ldam_margins(counts, 0.4), 20.0, **kw), z)
    close(got, exp, 1e-5)
    close(g_got, g_exp, 1e-5)


@pytest.mark.parametrize("opts", OPTIONS)
def test_gcl_module_equals_reference(opts):
    cos, y, counts = inputs(seed=4, cosine=True)
    loss = fastlt.GCLLoss(counts, m=0.1, s=20.0, noise_mul=0.5, gamma=1.0, **opts)
    kw = _weight_kw(opts)
    cloud = P.gcl_cloud(counts)
    got, g_got = grad_of(lambda x: loss(x, y, seed=17), cos)
    exp, g_exp = grad_of(lambda x: R.gcl_cross_entropy(x, y, cloud, 0.1, 20.0, 0.5, 1.0, seed=17, **kw), cos)
    close(got, exp, 1e-5)
    close(g_got, g_exp, 1e-5)


def test_gcl_module_folds_noise_mul_into_the_cloud_for_the_kernels():
    """With noise_mul other than 0 and 1, GCLLoss hands the kernels noise_mul * cloud (fp32) and noise_mul 1
    (no multiply per column in the kernels): the same numbers as the functional call that multiplies in the kernel,
    bit for bit, and the product is remade when noise_mul or the buffer changes."""
    cos, y, counts = inputs(seed=6, cosine=True)
    loss = fastlt.GCLLoss(counts, m=0.1, s=20.0, noise_mul=0.3, gamma=1.0, backend="triton")

    def functional(x, mul):
        return LF.gcl_cross_entropy(x, y, loss.cloud, 0.1, 20.0, mul, 1.0, seed=23, backend="triton")

    for mul in (0.3, 0.7):
        loss.noise_mul = mul
        got, g_got = grad_of(lambda x: loss(x, y, seed=23), cos)
        exp, g_exp = grad_of(lambda x, mul=mul: functional(x, mul), cos)
        assert torch.equal(got, exp) and torch.equal(g_got, g_exp)
        cloud, one = loss._fold(loss.cloud, loss.noise_mul)
        assert one == 1.0 and torch.equal(cloud, loss.cloud.float() * mul)
    held = loss._fold(loss.cloud, loss.noise_mul)[0]
    assert loss._fold(loss.cloud, loss.noise_mul)[0] is held  # made once while nothing changes
    loss.cloud.mul_(0.5)  # the buffer changed in place: remade
    assert torch.equal(loss._fold(loss.cloud, loss.noise_mul)[0], loss.cloud.float() * 0.7)
    got, _ = grad_of(lambda x: loss(x, y, seed=23), cos)
    exp, _ = grad_of(lambda x: functional(x, 0.7), cos)
    assert torch.equal(got, exp)


def test_gcl_module_defaults_are_the_official_loss_class():
    loss = fastlt.GCLLoss([100, 10, 1])
    assert (loss.m, loss.s, loss.noise_mul, loss.gamma) == (0.5, 30.0, 1.0, 0.0)
    lade = fastlt.LADELoss([100, 10, 1])
    assert (lade.alpha, lade.remine_lambda) == (0.1, 0.1)
    ldam = fastlt.LDAMLoss([100, 10, 1])
    assert (ldam.max_margin, ldam.s) == (0.5, 30.0)
    assert fastlt.LogitAdjustedLoss([1, 2]).tau == 1.0


def test_gcl_module_unseeded_follows_manual_seed():
    cos, y, counts = inputs(seed=5, cosine=True)
    loss = fastlt.GCLLoss(counts)
    torch.manual_seed(77)
    a = loss(cos, y)
    torch.manual_seed(77)
    b = loss(cos, y)
    c = loss(cos, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("opts", [o for o in OPTIONS if o.get("reduction") != "none"])
def test_lade_module_equals_reference(opts):
    z, y, counts = inputs(seed=6)
    loss = fastlt.LADELoss(counts, alpha=0.3, remine_lambda=0.2, **opts)
    kw = _weight_kw(opts)
    got, g_got = grad_of(lambda x: loss(x, y), z)
    exp, g_exp = grad_of(lambda x: R.lade_loss(x, y, P.prior(counts), 0.3, 0.2, **kw), z)
    close(got, exp)
    close(g_got, g_exp)


def test_lade_module_rejects_reduction_none():
    with pytest.raises(ValueError, match="reduction"):
        fastlt.LADELoss([3, 2, 1], reduction="none")
    loss = fastlt.LADELoss([3, 2, 1])
    with pytest.raises(ValueError, match="reduction"):  # assigned later: refused there (test_lade_head.py)
        loss.reduction = "none"
    z, y, _ = inputs(5, 3, seed=7)
    assert torch.isfinite(loss(z, y))


def all_modules(counts):
    return {
        "la": fastlt.LogitAdjustedLoss(counts, tau=0.7,
                                       weight=torch.rand(len(counts), generator=gen(0)) + 0.5),
        "bs": fastlt.BalancedSoftmaxLoss(counts),
        "ldam": fastlt.LDAMLoss(counts),
        "gcl": fastlt.GCLLoss(counts),
        "lade": fastlt.LADELoss(counts),
    }


@pytest.mark.parametrize("cls", [fastlt.LogitAdjustedLoss, fastlt.LDAMLoss, fastlt.GCLLoss, fastlt.LADELoss])
def test_module_count_smoothing_non_integer(cls):
    """count_smoothing=0.5 is valid (``counts + eps``): the module must build, like the priors."""
    counts = [10, 0, 5]
    mod = cls(counts, count_smoothing=0.5)
    smoothed = torch.tensor([10.5, 0.5, 5.5], dtype=F64)
    vec = {fastlt.LogitAdjustedLoss: ("log_prior", torch.log(smoothed / smoothed.sum())),
           fastlt.LDAMLoss: ("margins", smoothed**-0.25 * 0.5 / (smoothed**-0.25).max()),
           fastlt.GCLLoss: ("cloud", (smoothed.log().max() - smoothed.log()) / (smoothed.log().max()
                                                                                - smoothed.log()).max()),
           fastlt.LADELoss: ("prior", smoothed / smoothed.sum())}[cls]
    close(getattr(mod, vec[0]).double(), vec[1], 1e-6)


@pytest.mark.parametrize("cls", [fastlt.LogitAdjustedLoss, fastlt.LDAMLoss, fastlt.GCLLoss, fastlt.LADELoss])
def test_module_count_smoothing_integer(cls):
    mod = cls([10, 0, 5], count_smoothing=1.0)
    z, y, _ = inputs(6, 3, seed=9)
    assert torch.isfinite(mod(z, y)).all()
    with pytest.raises(ValueError, match="count_smoothing"):
        cls([10, 0, 5])


def test_tau_schedule_takes_effect():
    z, y, counts = inputs(seed=10)
    loss = fastlt.LogitAdjustedLoss(counts)
    log_pi = P.log_prior(counts)
    values = []
    for tau in (0.0, 0.5, 1.0, 1.5):
        loss.tau = tau
        out = loss(z, y)
        close(out, F.cross_entropy(z + tau * log_pi, y), 1e-5)
        values.append(out.item())
    assert len(set(values)) == 4


def test_other_hyperparameters_take_effect():
    z, y, counts = inputs(seed=11)
    cos = z.tanh()
    ldam = fastlt.LDAMLoss(counts)
    base = ldam(z, y)
    ldam.s = 5.0
    close(ldam(z, y), R.ldam_cross_entropy(z, y, P.ldam_margins(counts), 5.0))
    assert not torch.allclose(ldam(z, y), base)

    gcl = fastlt.GCLLoss(counts)
    for attr, value in (("m", 0.1), ("s", 20.0), ("noise_mul", 0.5), ("gamma", 1.0)):
        before = gcl(cos, y, seed=4)
        setattr(gcl, attr, value)
        after = gcl(cos, y, seed=4)
        assert not torch.allclose(before, after), attr
    close(gcl(cos, y, seed=4), R.gcl_cross_entropy(cos, y, P.gcl_cloud(counts), 0.1, 20.0, 0.5, 1.0, seed=4))

    lade = fastlt.LADELoss(counts)
    for attr, value in (("alpha", 0.5), ("remine_lambda", 0.3)):
        before = lade(z, y)
        setattr(lade, attr, value)
        assert not torch.allclose(before, lade(z, y)), attr
    close(lade(z, y), R.lade_loss(z, y, P.prior(counts), 0.5, 0.3))

    la = fastlt.LogitAdjustedLoss(counts)
    la.reduction = "sum"
    close(la(z, y), F.cross_entropy(z + P.log_prior(counts), y, reduction="sum"), 1e-5)
    la.label_smoothing = 0.3
    close(la(z, y), F.cross_entropy(z + P.log_prior(counts), y, reduction="sum", label_smoothing=0.3), 1e-5)


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade"])
def test_backward_reaches_parameters(name):
    z, y, counts = inputs(seed=12)
    mod = all_modules(counts)[name]
    head = torch.nn.Linear(5, 7)
    feats = torch.randn(24, 5, generator=gen(13))
    logits = head(feats)
    if name == "gcl":
        logits = torch.tanh(logits)
    out = mod(logits, y)
    out.backward()
    assert head.weight.grad is not None
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["la", "ldam", "gcl", "lade"])
def test_backend_torch_equals_auto_on_cpu(name):
    z, y, counts = inputs(seed=14)
    cls = {"la": fastlt.LogitAdjustedLoss, "ldam": fastlt.LDAMLoss, "gcl": fastlt.GCLLoss,
           "lade": fastlt.LADELoss}[name]
    a = cls(counts, backend="torch")
    b = cls(counts, backend="auto")
    kw = dict(seed=1) if name == "gcl" else {}
    close(a(z, y, **kw), b(z, y, **kw), 0)


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs Triton on the CPU")
@pytest.mark.parametrize("cls", [fastlt.LogitAdjustedLoss, fastlt.LDAMLoss, fastlt.GCLLoss, fastlt.LADELoss])
def test_backend_triton_on_cpu_tensors_raises(cls):
    z, y, counts = inputs(seed=15)
    mod = cls(counts, backend="triton")
    with pytest.raises(RuntimeError, match="(?i)cuda|triton"):
        mod(z, y)


@pytest.mark.parametrize("cls", [fastlt.LogitAdjustedLoss, fastlt.LDAMLoss, fastlt.GCLLoss])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_grad_in_forward_needs_triton(cls, backend):
    z, y, counts = inputs(seed=17)
    mod = cls(counts, backend=backend, grad_in_forward=True)
    with pytest.raises(ValueError, match="grad_in_forward"):
        mod(z, y)
    with pytest.raises(ValueError, match="grad_in_forward"):
        LF.adjusted_cross_entropy(z, y, backend=backend, grad_in_forward=True)


def test_module_repr_mentions_hyperparameters():
    text = repr(fastlt.GCLLoss([3, 2, 1], m=0.1, s=20.0))
    assert "m=0.1" in text and "s=20.0" in text
    assert "tau=0.5" in repr(fastlt.LogitAdjustedLoss([3, 2, 1], tau=0.5))
