"""The loss modules' direct call of the kernels' glue (fastlt.losses, ``_LongTailLoss._direct``): plain (N, C)
logits on the kernels skip fastlt.functional's dispatch (host time) and give what the dispatch gives, with its
warnings and its errors; every other call still goes through the dispatch (the kernels in the interpreter without a
GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import fastlt
from fastlt import functional as LF
from fastlt.distributed import data_parallel

WEIGHT = [0.5, 1.0, 2.0, 1.5, 0.7, 1.1, 0.9]


def _data(N=6, C=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[1] = 3  # the ignored class of the options below
    counts = torch.randint(1, 100, (C,), generator=g)
    return z, y, counts


MODULES = {
    "la": lambda counts, **kw: fastlt.LogitAdjustedLoss(counts, tau=0.7, **kw),
    "bs": lambda counts, **kw: fastlt.BalancedSoftmaxLoss(counts, **kw),
    "ldam": lambda counts, **kw: fastlt.LDAMLoss(counts, max_margin=0.4, s=8.0, **kw),
    "gcl": lambda counts, **kw: fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0, **kw),
    "lade": lambda counts, **kw: fastlt.LADELoss(counts, alpha=0.2, **kw),
}
DISPATCH = ("adjusted_cross_entropy", "logit_adjusted_cross_entropy", "balanced_softmax_cross_entropy",
            "ldam_cross_entropy", "gcl_cross_entropy", "lade_loss")


def _refuse_dispatch(monkeypatch):
    for name in DISPATCH:
        monkeypatch.setattr(LF, name, lambda *a, _name=name, **k: pytest.fail(f"{_name} was called"))


def _call(crit, z, y, name):
    return crit(z, y, seed=5) if name == "gcl" else crit(z, y)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("options", [dict(), dict(weight=WEIGHT, ignore_index=3, label_smoothing=0.1, dp_group=False),
                                     dict(reduction="sum")])
def test_direct_calls_match_the_reference_without_the_dispatch(monkeypatch, name, options):
    z, y, counts = _data(seed=len(name))
    if name == "lade" and "weight" in options:
        options = {k: v for k, v in options.items() if k != "label_smoothing"}
    crit = MODULES[name](counts, backend="triton", **options).to(DEVICE)
    ref = MODULES[name](counts, backend="torch", **options).double()
    wants = []
    for step in range(2):
        zr = (z * (step + 1)).double().requires_grad_()
        want = _call(ref, zr, y, name)
        want.backward()
        wants.append((want.detach(), zr.grad))
    _refuse_dispatch(monkeypatch)
    for step, (want, want_grad) in enumerate(wants):  # the second call reuses the cached arguments
        zt = (z * (step + 1)).to(DEVICE).requires_grad_()
        got = _call(crit, zt, y.to(DEVICE), name)
        got.backward()
        torch.testing.assert_close(got.detach().cpu().double(), want, rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(zt.grad.cpu().double(), want_grad, rtol=2e-5, atol=2e-5)


def test_a_drawn_gcl_seed_is_the_reference_one():
    z, y, counts = _data()
    crit = MODULES["gcl"](counts, backend="triton").to(DEVICE)
    ref = MODULES["gcl"](counts, backend="torch")
    torch.manual_seed(11)
    got = [crit(z.to(DEVICE), y.to(DEVICE)) for _ in range(3)]
    torch.manual_seed(11)
    want = [ref(z, y) for _ in range(3)]
    assert len({float(g) for g in got}) == 3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["la", "lade"])
def test_other_calls_go_through_the_dispatch(monkeypatch, name):
    """Logits of other shapes (positions as rows, unbatched) and the reference backend take fastlt.functional."""
    z, y, counts = _data()
    called = []
    target = "lade_loss" if name == "lade" else "logit_adjusted_cross_entropy"
    original = getattr(LF, target)
    monkeypatch.setattr(LF, target, lambda *a, **k: called.append(1) or original(*a, **k))
    crit = MODULES[name](counts, backend="triton").to(DEVICE)
    ref = MODULES[name](counts, backend="torch")
    z3 = z.reshape(2, 3, 7).transpose(1, 2).contiguous()  # (N, C, d): 2 x 7 x 3
    y3 = y.reshape(2, 3)
    got = crit(z3.to(DEVICE), y3.to(DEVICE))
    torch.testing.assert_close(got.cpu(), ref(z3, y3), rtol=1e-5, atol=1e-5)
    assert called == [1, 1]  # the module's call and the reference's
    crit.backend = "torch"
    crit(z.to(DEVICE), y.to(DEVICE))
    assert called == [1, 1, 1]


@pytest.mark.parametrize("name, options, warned", [
    ("la", dict(), []),
    ("la", dict(weight=WEIGHT), ["a class-weighted 'mean'"]),
    ("la", dict(weight=WEIGHT, reduction="sum"), []),
    ("la", dict(weight=WEIGHT, dp_group=False), []),
    ("gcl", dict(weight=WEIGHT), ["a class-weighted 'mean'"]),
    ("lade", dict(), ["LADELoss / lade_loss"]),
    ("lade", dict(dp_group=False), []),
])
def test_direct_calls_warn_as_the_dispatch_does(monkeypatch, name, options, warned):
    """Without dp_group a loss that depends on the batch split asks fastlt.distributed to warn (it warns once under
    several ranks), on the direct path as on the dispatch."""
    z, y, counts = _data()
    seen = []
    monkeypatch.setattr(LF, "warn_without_group", seen.append)  # the dispatch's
    monkeypatch.setattr(data_parallel, "warn_without_group", seen.append)  # the direct path's (kernels_direct)
    crit = MODULES[name](counts, backend="triton", **options).to(DEVICE)
    _call(crit, z.to(DEVICE), y.to(DEVICE), name)
    assert seen == warned
    seen.clear()
    options = {k: (torch.tensor(v) if k == "weight" else v) for k, v in options.items()}
    LF_call = {"la": lambda: LF.logit_adjusted_cross_entropy(z, y, crit.log_prior.cpu(), 0.7, backend="torch",
                                                             **options),
               "gcl": lambda: LF.gcl_cross_entropy(z, y, crit.cloud.cpu(), seed=5, backend="torch", **options),
               "lade": lambda: LF.lade_loss(z, y, crit.prior.cpu(), backend="torch", **options)}[name]
    LF_call()
    assert seen == warned  # the dispatch asks the same


@pytest.mark.parametrize("name, attr, bad, match", [
    ("gcl", "m", float("nan"), r"^m must be"),
    ("gcl", "s", float("inf"), r"^s must be"),
    ("ldam", "s", float("nan"), r"^s must be"),
    ("la", "tau", float("nan"), r"tau"),
])
def test_direct_calls_name_a_bad_hyperparameter(name, attr, bad, match):
    z, y, counts = _data()
    crit = MODULES[name](counts, backend="triton").to(DEVICE)
    _call(crit, z.to(DEVICE), y.to(DEVICE), name)
    setattr(crit, attr, bad)
    with pytest.raises(ValueError, match=match):
        _call(crit, z.to(DEVICE), y.to(DEVICE), name)


def test_direct_calls_check_the_inputs():
    z, y, counts = _data()
    crit = MODULES["la"](counts, backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match="class"):
        crit(torch.randn(6, 5, device=DEVICE), y.to(DEVICE))
    with pytest.raises(ValueError, match="target"):
        crit(z.to(DEVICE), y[:4].to(DEVICE))
    with pytest.raises(TypeError, match="float64|float32"):
        crit(z.double().to(DEVICE), y.to(DEVICE))
