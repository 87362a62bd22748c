"""The nn.Module API (fastlt.losses, fastlt.cosine) and fastlt.functional's backend switch, CPU only."""

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


def test_ldam_max_margin_can_be_scheduled():
    """Setting max_margin rebuilds the margins (device and dtype kept); a bad value names the argument."""
    z, y, counts = inputs(seed=3)
    loss = fastlt.LDAMLoss(counts, max_margin=0.5, s=20.0, backend="torch").double()
    loss.max_margin = 0.2
    assert loss.max_margin == 0.2 and loss.margins.dtype == torch.float64
    torch.testing.assert_close(loss.margins, P.ldam_margins(counts, 0.2).double())
    torch.testing.assert_close(loss(z.double(), y), R.ldam_cross_entropy(z.double(), y, P.ldam_margins(counts, 0.2)
                                                                         .double(), 20.0))
    with pytest.raises(ValueError, match="max_margin"):
        loss.max_margin = -0.1
    assert loss.max_margin == 0.2


def test_functional_errors_name_s_and_m():
    cos, y, counts = inputs(seed=4, cosine=True)
    cloud = P.gcl_cloud(counts)
    with pytest.raises(ValueError, match=r"^s must be finite"):
        LF.gcl_cross_entropy(cos, y, cloud, s=float("inf"))
    with pytest.raises(ValueError, match=r"^m must be finite"):
        R.gcl_cross_entropy(cos, y, cloud, m=float("nan"))
    with pytest.raises(TypeError, match=r"^s must be a real number"):
        LF.ldam_cross_entropy(cos, y, P.ldam_margins(counts), s="30")


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
    loss.reduction = "none"
    z, y, _ = inputs(5, 3, seed=7)
    with pytest.raises(ValueError, match="reduction"):
        loss(z, y)


# ----------------------------------------------------------------------------------------------
# buffers, attributes, backward
# ----------------------------------------------------------------------------------------------

def all_modules(counts):
    return {
        "la": fastlt.LogitAdjustedLoss(counts, tau=0.7,
                                       weight=torch.rand(len(counts), generator=gen(0)) + 0.5),
        "bs": fastlt.BalancedSoftmaxLoss(counts),
        "ldam": fastlt.LDAMLoss(counts),
        "gcl": fastlt.GCLLoss(counts),
        "lade": fastlt.LADELoss(counts),
    }


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade"])
def test_buffers_follow_dtype_and_device(name):
    z, y, counts = inputs(seed=8)
    mod = all_modules(counts)[name]
    buffers = dict(mod.named_buffers())
    assert buffers, "per-class vectors must be registered buffers"
    assert all(b.dtype == torch.float32 for b in buffers.values())
    out32 = mod(z, y, seed=3) if name == "gcl" else mod(z, y)
    mod64 = mod.to(F64)
    assert mod64 is mod
    exact = _exact_buffers(counts)
    for key, b in mod.named_buffers():
        assert b.dtype == F64, key
        # count-derived buffers are computed again in float64 (not the float32 roundings widened)
        close(b, exact[key] if key in exact else buffers[key].to(F64), 0)
        close(b.float(), buffers[key], 0)
    out64 = mod(z.to(F64), y, seed=3) if name == "gcl" else mod(z.to(F64), y)
    assert out64.dtype == F64
    close(out64.float(), out32, 1e-5)
    mod.to("cpu")
    assert all(b.device.type == "cpu" for b in mod.buffers())
    mod.half()
    assert all(b.dtype == torch.float16 for b in mod.buffers())


def _exact_buffers(counts) -> dict:
    c = torch.as_tensor(counts, dtype=F64)
    return {"class_counts": c, "log_prior": P.log_prior(counts, dtype=F64),
            "margins": P.ldam_margins(counts, 0.5, dtype=F64), "cloud": P.gcl_cloud(counts, dtype=F64),
            "prior": P.prior(counts, dtype=F64)}


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade"])
def test_float64_module_equals_the_float64_formula(name):
    """A module made float64 computes its per-class vectors from the counts in float64: its loss is the float64
    reference's with float64 priors to ~1e-15, not the ~1e-8 that widened float32 roundings would give."""
    counts = [3, 100, 7, 1000, 29]
    z = torch.randn(6, 5, generator=gen(5), dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    mod = all_modules(counts)[name]
    mod.double()
    ex = _exact_buffers(counts)
    w = mod.weight
    if name in ("la", "bs"):
        expected = R.logit_adjusted_cross_entropy(z, y, ex["log_prior"], mod.tau, weight=w)
    elif name == "ldam":
        expected = R.ldam_cross_entropy(z, y, ex["margins"], mod.s)
    elif name == "gcl":
        expected = R.gcl_cross_entropy(z, y, ex["cloud"], mod.m, mod.s, mod.noise_mul, seed=11)
    else:
        expected = R.lade_loss(z, y, ex["prior"], mod.alpha, mod.remine_lambda)
    got = mod(z, y, seed=11) if name == "gcl" else mod(z, y)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    if name == "ldam":  # a scheduled margin stays exact in float64 too
        mod.max_margin = 0.25
        close(mod.margins, P.ldam_margins(counts, 0.25, dtype=F64), 0)


def _every_counted_module(counts):
    C = len(counts)
    return {**all_modules(counts),
            **{f"{loss}-head": fastlt.LinearLossHead(3, C, counts, loss=loss) for loss in ("la", "ldam", "lade")},
            "gcl-head": fastlt.CosineGCLHead(3, C, counts)}


@pytest.mark.parametrize("name", ["la", "bs", "ldam", "gcl", "lade", "la-head", "ldam-head", "lade-head", "gcl-head"])
def test_modules_pickle_and_copy_with_their_count_buffers(name):
    """torch.save of a whole module round-trips (the count buffers' makers are module-level functions, not
    closures), and a deep copy's LDAM margin schedule rebuilds the copy's margins from the copy's max_margin."""
    import copy
    import io

    counts = [500, 100, 20, 4]
    mod = _every_counted_module(counts)[name]
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for (key, b), (key2, b2) in zip(mod.named_buffers(), loaded.named_buffers(), strict=True):
        assert key == key2
        close(b2, b, 0)
    loaded.double()
    for key, b in loaded.named_buffers():
        assert b.dtype == F64, key
    if "ldam" in name:
        twin = copy.deepcopy(mod)
        twin.max_margin = 0.1
        close(twin.margins, P.ldam_margins(counts, 0.1), 0)
        close(mod.margins, P.ldam_margins(counts, 0.5), 0)


def test_count_buffers_the_user_set_or_edited_are_only_converted():
    """A float64 conversion makes the module's own count buffers again from the counts, and only those: one the user
    assigned or edited in place is widened as any buffer; conversions that keep float64 (a device move,
    share_memory) leave every buffer alone; the class_counts buffer is no alias of the exact counts."""
    counts = [500, 100, 20, 4]
    mod = fastlt.LogitAdjustedLoss(counts)
    mod.log_prior = torch.zeros(4)
    mod.double()
    close(mod.log_prior, torch.zeros(4, dtype=F64), 0)
    mod = fastlt.LDAMLoss(counts)
    mod.margins.mul_(2.0)
    mod.double()
    close(mod.margins, (2.0 * P.ldam_margins(counts, 0.5)).double(), 0)
    mod = fastlt.LogitAdjustedLoss(counts).double()
    mod.class_counts.add_(1000.0)
    mod.cpu()
    close(mod.log_prior, P.log_prior(counts, dtype=F64), 0)
    mod = fastlt.GCLLoss(counts).double().share_memory()
    assert all(b.is_shared() for b in mod.buffers())


def test_float64_head_made_so_equals_one_converted():
    counts = [500, 100, 20, 4]
    for loss in ("la", "ldam", "lade"):
        made = fastlt.LinearLossHead(3, 4, counts, loss=loss, dtype=F64)
        converted = fastlt.LinearLossHead(3, 4, counts, loss=loss).double()
        for (name, a), (_, b) in zip(made.named_buffers(), converted.named_buffers(), strict=True):
            assert a.dtype == F64, name
            close(a, b, 0)
    assert fastlt.CosineGCLHead(3, 4, counts, dtype=F64).cloud.dtype == F64
    assert fastlt.LinearLossHead(3, 4, counts, dtype=torch.bfloat16).log_prior.dtype == torch.float32


def test_buffer_values():
    counts = [500, 100, 20, 4]
    mods = all_modules(counts)
    close(mods["la"].log_prior, P.log_prior(counts), 0)
    close(mods["ldam"].margins, P.ldam_margins(counts, 0.5), 0)
    close(mods["gcl"].cloud, P.gcl_cloud(counts), 0)
    close(mods["lade"].prior, P.prior(counts), 0)
    assert all(m.num_classes == 4 for m in mods.values())


@pytest.mark.parametrize("cls", [fastlt.LogitAdjustedLoss, fastlt.LDAMLoss, fastlt.GCLLoss, fastlt.LADELoss])
def test_module_count_smoothing_non_integer(cls):
    """count_smoothing=0.5 is valid (SPEC 3: ``counts + eps``): the module must build, like the priors."""
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


@pytest.mark.skipif(INTERPRET, reason="the interpreter runs Triton on the CPU")
def test_functional_backend_triton_on_cpu_raises():
    z, y, counts = inputs(seed=16)
    with pytest.raises(RuntimeError, match="(?i)cuda|triton"):
        LF.logit_adjusted_cross_entropy(z, y, P.log_prior(counts), backend="triton")
    with pytest.raises(RuntimeError, match="(?i)cuda|triton"):
        LF.lade_loss(z, y, P.prior(counts), backend="triton")


@pytest.mark.parametrize("cls", [fastlt.LogitAdjustedLoss, fastlt.LDAMLoss, fastlt.GCLLoss])
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_grad_in_forward_needs_triton(cls, backend):
    z, y, counts = inputs(seed=17)
    mod = cls(counts, backend=backend, grad_in_forward=True)
    with pytest.raises(ValueError, match="grad_in_forward"):
        mod(z, y)
    with pytest.raises(ValueError, match="grad_in_forward"):
        LF.adjusted_cross_entropy(z, y, backend=backend, grad_in_forward=True)


def test_functional_torch_backend_equals_reference():
    z, y, counts = inputs(seed=18)
    cos = z.tanh()
    lp, pi = P.log_prior(counts), P.prior(counts)
    pairs = [
        (LF.logit_adjusted_cross_entropy(z, y, lp, 0.8, backend="torch"),
         R.logit_adjusted_cross_entropy(z, y, lp, 0.8)),
        (LF.balanced_softmax_cross_entropy(z, y, lp, backend="torch"),
         R.balanced_softmax_cross_entropy(z, y, lp)),
        (LF.ldam_cross_entropy(z, y, P.ldam_margins(counts), 30.0, backend="torch"),
         R.ldam_cross_entropy(z, y, P.ldam_margins(counts), 30.0)),
        (LF.gcl_cross_entropy(cos, y, P.gcl_cloud(counts), seed=3, backend="torch"),
         R.gcl_cross_entropy(cos, y, P.gcl_cloud(counts), seed=3)),
        (LF.lade_loss(z, y, pi, backend="torch"), R.lade_loss(z, y, pi)),
        (LF.adjusted_cross_entropy(z, y, log_prior=lp, margin=0.2, scale=2.0, gamma=1.0, backend="auto"),
         R.adjusted_cross_entropy(z, y, log_prior=lp, margin=0.2, scale=2.0, gamma=1.0)),
    ]
    for got, exp in pairs:
        assert torch.equal(got, exp)
    assert LF.use_triton("torch", z) is False
    assert LF.use_triton("auto", z) is False


def test_module_repr_mentions_hyperparameters():
    text = repr(fastlt.GCLLoss([3, 2, 1], m=0.1, s=20.0))
    assert "m=0.1" in text and "s=20.0" in text
    assert "tau=0.5" in repr(fastlt.LogitAdjustedLoss([3, 2, 1], tau=0.5))


# ----------------------------------------------------------------------------------------------
# CosineClassifier
# ----------------------------------------------------------------------------------------------

def test_cosine_classifier_output():
    torch.manual_seed(0)
    head = fastlt.CosineClassifier(16, 9)
    x = torch.randn(13, 16, generator=gen(19)) * 5
    out = head(x)
    W = head.weight.detach()
    expected = (x / x.norm(dim=1, keepdim=True)) @ (W / W.norm(dim=1, keepdim=True)).T
    assert out.shape == (13, 9)
    close(out, expected, 1e-6)
    assert out.min().item() >= -1.0 - 1e-6 and out.max().item() <= 1.0 + 1e-6
    # scale invariance in features and weights
    close(head(x * 7.5), out, 1e-6)
    # cos(w_j, w_j) = 1
    close(head(W[:3] * 2)[torch.arange(3), torch.arange(3)], torch.ones(3), 1e-6)


def test_cosine_classifier_backward_and_gcl_pipeline():
    torch.manual_seed(1)
    head = fastlt.CosineClassifier(8, 5)
    x = torch.randn(20, 8, generator=gen(20), requires_grad=True)
    y = torch.randint(0, 5, (20,), generator=gen(21))
    loss = fastlt.GCLLoss([500, 100, 50, 10, 2])(head(x), y, seed=0)
    loss.backward()
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_cosine_classifier_zero_feature_is_finite():
    head = fastlt.CosineClassifier(4, 3)
    out = head(torch.zeros(2, 4))
    assert torch.isfinite(out).all()
    assert torch.all(out == 0)


def test_cosine_classifier_bad_arguments():
    with pytest.raises(ValueError, match="in_features"):
        fastlt.CosineClassifier(0, 3)
    with pytest.raises(ValueError, match="num_classes"):
        fastlt.CosineClassifier(3, 0)
    for args, exc, match in [((4.0, 3), TypeError, "in_features"), ((True, 3), TypeError, "in_features"),
                             ((4, 3, -1.0), ValueError, "eps"), ((4, 3, 0.0), ValueError, "eps"),
                             ((4, 3, "x"), TypeError, "eps")]:
        with pytest.raises(exc, match=match):
            fastlt.CosineClassifier(*args)
    head = fastlt.CosineClassifier(4, 3)
    with pytest.raises(TypeError, match="features"):
        head(torch.zeros(2, 4, dtype=torch.long))
    import numpy as np

    assert fastlt.CosineClassifier(np.int64(4), np.int64(3)).weight.shape == (3, 4)  # e.g. labels.max() + 1
    with pytest.raises(ValueError, match="features"):
        head(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="features"):
        head(torch.zeros(4))
