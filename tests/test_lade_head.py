"""The fused LADE linear head (two passes over row chunks) against the float64 unfused oracle."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, DTYPES
from oracle import assert_oracle_close

from fastlt.lade_head import lade_linear_loss, reference_lade_linear_loss
from fastlt.priors import prior


def _inputs(N, D, C, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(DEVICE, dtype)
    w = torch.randn(C, D, generator=g).div(D ** 0.5).to(DEVICE, dtype)
    b = torch.randn(C, generator=g).to(DEVICE, dtype) if bias else None
    y = torch.randint(0, C, (N,), generator=g).to(DEVICE)
    pi = prior(torch.randint(1, 100, (C,), generator=g)).to(DEVICE)
    return x, w, b, y, pi


def _grads(fn, tensors, scale):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    loss = fn(*leaves)
    (scale * loss).backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def _check(N, D, C, dtype, *, bias=True, chunk_rows=None, chunk_classes=None, grad_scale=1.0, ignore_rows=(), **kw):
    x, w, b, y, pi = _inputs(N, D, C, dtype, bias=bias)
    for r in ignore_rows:
        y[r] = -100

    def fused(x, w, b):
        return lade_linear_loss(x, w, y, pi, b, backend="triton", chunk_rows=chunk_rows, chunk_classes=chunk_classes,
                                **kw)

    def ref(x, w, b, dt=None):
        cast = (lambda t: None if t is None else t.to(dt)) if dt else (lambda t: t)
        return reference_lade_linear_loss(cast(x), cast(w), y, pi.double() if dt == torch.float64 else pi, cast(b),
                                          **kw)

    got, g_got = _grads(fused, (x, w, b), grad_scale)
    r64, g64 = _grads(lambda *t: ref(*t, dt=torch.float64), (x, w, b), grad_scale)
    same, g_same = _grads(ref, (x, w, b), grad_scale)
    assert got.dtype == dtype
    assert_oracle_close(got, r64, same, dtype, what="loss")
    for name, a, r, s in zip(("dF", "dW", "db"), g_got, g64, g_same, strict=True):
        if a is None:
            assert r is None
            continue
        assert_oracle_close(a, r, s, dtype, factor=3.0, what=name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_lade_head_matches_reference(dtype, reduction, chunk_rows):
    _check(11, 8, 13, dtype, chunk_rows=chunk_rows, reduction=reduction, grad_scale=2.5, ignore_rows=(2,))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lade_head_class_chunks_match_reference(dtype, reduction):
    _check(11, 8, 21, dtype, chunk_classes=8, reduction=reduction, grad_scale=2.5, ignore_rows=(2,))


@pytest.mark.parametrize("N,C,cols", [(1, 1, 8), (5, 7, 8), (9, 300, 128)])
def test_lade_head_class_chunks_odd_sizes_weights_smoothing(N, C, cols):
    wc = torch.rand(C, generator=torch.Generator().manual_seed(C)).add(0.5).to(DEVICE)
    _check(N, 5, C, torch.float32, chunk_classes=cols, weight_classes=wc, label_smoothing=0.1, alpha=0.3)


def test_lade_head_class_and_row_chunks_agree():
    x, w, b, y, pi = _inputs(13, 8, 37, torch.float32)
    y[4] = -100
    outs = [_grads(lambda x, w, b, e=e: lade_linear_loss(x, w, y, pi, b, backend="triton", **e), (x, w, b), 1.0)
            for e in (dict(chunk_rows=4), dict(chunk_classes=8), dict(chunk_classes=32))]
    for loss, grads in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, outs[0][1], strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("N,D,C,chunk_rows", [(1, 4, 1, None), (3, 5, 7, 1), (17, 6, 1000, 5), (9, 1, 3, 2)])
def test_lade_head_odd_sizes(N, D, C, chunk_rows):
    _check(N, D, C, torch.float32, chunk_rows=chunk_rows)


def test_lade_head_weights_smoothing_no_bias():
    C = 9
    wc = torch.rand(C, generator=torch.Generator().manual_seed(3)).add(0.5).to(DEVICE)
    _check(10, 6, C, torch.float32, bias=False, chunk_rows=3, weight_classes=wc, label_smoothing=0.1, alpha=0.3,
           remine_lambda=0.2)


def test_lade_head_chunking_does_not_change_the_result():
    x, w, b, y, pi = _inputs(13, 8, 21, torch.float32)
    outs = [_grads(lambda x, w, b, c=c: lade_linear_loss(x, w, y, pi, b, backend="triton", chunk_rows=c),
                   (x, w, b), 1.0) for c in (None, 5, 1)]
    for loss, grads in outs[1:]:
        torch.testing.assert_close(loss, outs[0][0], rtol=1e-5, atol=1e-6)
        for a, r in zip(grads, outs[0][1], strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunks", [{}, dict(chunk_rows=2), dict(chunk_classes=8)], ids=["one", "rows", "classes"])
def test_lade_head_all_rows_ignored_is_nan_like_torch(chunks):
    x, w, b, y, pi = _inputs(4, 3, 5, torch.float32)
    y[:] = -100
    got = lade_linear_loss(x, w, y, pi, b, backend="triton", **chunks)
    ref = reference_lade_linear_loss(x, w, y, pi, b)
    assert torch.isnan(got) and torch.isnan(ref)
    got = lade_linear_loss(x, w, y, pi, b, backend="triton", reduction="sum", **chunks)
    torch.testing.assert_close(got, reference_lade_linear_loss(x, w, y, pi, b, reduction="sum"))
    assert got.item() == 0.0
    for reduction in ("mean", "sum"):  # zero gradients, as the reference's, not NaN from 1 / sum w = inf
        _, grads = _grads(lambda x, w, b, r=reduction: lade_linear_loss(x, w, y, pi, b, backend="triton",
                                                                        reduction=r, **chunks), (x, w, b), 1.0)
        _, want = _grads(lambda x, w, b, r=reduction: reference_lade_linear_loss(x, w, y, pi, b, reduction=r),
                         (x, w, b), 1.0)
        for g, r in zip(grads, want, strict=True):
            assert torch.equal(r, torch.zeros_like(r)) and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("chunks", [{}, dict(chunk_rows=2), dict(chunk_classes=8)], ids=["one", "rows", "classes"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lade_head_empty_batch(chunks, reduction):
    x, w, b, y, pi = _inputs(0, 3, 5, torch.float32)
    got, grads = _grads(lambda x, w, b: lade_linear_loss(x, w, y, pi, b, backend="triton", reduction=reduction,
                                                         **chunks), (x, w, b), 1.0)
    want, want_grads = _grads(lambda x, w, b: reference_lade_linear_loss(x, w, y, pi, b, reduction=reduction),
                              (x, w, b), 1.0)
    torch.testing.assert_close(got, want, equal_nan=True)
    for g, r in zip(grads, want_grads, strict=True):
        assert g is not None and g.shape == r.shape and (g == 0).all() and (r == 0).all()


def test_lade_head_no_grad_and_noncontiguous():
    x, w, b, y, pi = _inputs(6, 8, 7, torch.float32)
    xt = torch.cat([x, x], 1)[:, ::2]  # non-contiguous rows
    with torch.no_grad():
        got = lade_linear_loss(xt, w, y, pi, b, backend="triton", chunk_rows=4)
    torch.testing.assert_close(got, reference_lade_linear_loss(xt, w, y, pi, b), rtol=1e-5, atol=1e-5)


def test_lade_head_rejects_bad_input():
    x, w, b, y, pi = _inputs(4, 3, 5, torch.float32)
    with pytest.raises(ValueError, match="reduction='none'"):
        lade_linear_loss(x, w, y, pi, b, backend="triton", reduction="none")
    with pytest.raises(ValueError, match="prior"):
        lade_linear_loss(x, w, y, pi[:-1], b, backend="triton")
    with pytest.raises(ValueError, match="weight"):
        lade_linear_loss(x, w[:, :2], y, pi, b, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        lade_linear_loss(x.double(), w.double(), y, pi, None, backend="triton")
    with pytest.raises(ValueError, match="chunk_rows"):
        lade_linear_loss(x, w, y, pi, b, backend="triton", chunk_rows=0)
    with pytest.raises(ValueError, match="chunk_classes"):
        lade_linear_loss(x, w, y, pi, b, backend="triton", chunk_classes=12)
    with pytest.raises(ValueError, match="alpha"):
        lade_linear_loss(x, w, y, pi, b, backend="triton", alpha=float("nan"))


def test_linear_loss_head_lade_module_matches_torch_backend():
    import fastlt

    torch.manual_seed(0)
    counts = torch.randint(1, 60, (11,))
    fused = fastlt.LinearLossHead(6, 11, counts, loss="lade", alpha=0.2, backend="triton", chunk_rows=3).to(DEVICE)
    ref = fastlt.LinearLossHead(6, 11, counts, loss="lade", alpha=0.2, backend="torch").to(DEVICE)
    ref.load_state_dict(fused.state_dict())
    x = torch.randn(8, 6, device=DEVICE)
    y = torch.randint(0, 11, (8,), device=DEVICE)
    lf, lr = fused(x, y), ref(x, y)
    lf.backward()
    lr.backward()
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    expected = reference_lade_linear_loss(x, ref.weight, y, prior(counts).to(DEVICE), ref.bias, alpha=0.2)
    torch.testing.assert_close(lr, expected)
    z = fused.logits(x, adjusted=True)
    torch.testing.assert_close(z, torch.nn.functional.linear(x, fused.weight, fused.bias) + fused.log_prior)


def test_linear_loss_head_lade_rejects_none_reduction_and_scale():
    import fastlt

    with pytest.raises(ValueError, match="reduction='none'"):
        fastlt.LinearLossHead(4, 3, [5, 3, 1], loss="lade", reduction="none")
    with pytest.raises(ValueError, match="lade"):
        fastlt.LinearLossHead(4, 3, [5, 3, 1], loss="lade", s=30.0)


@pytest.mark.parametrize("name, value", [("s", 30.0), ("gamma", 1.0), ("tau", 0.5)])
def test_linear_loss_head_lade_refuses_the_terms_it_has_not_when_assigned(name, value):
    """A LADE head has no logit scale, focal factor or tau: assigned after construction, they were silently ignored
    (the loss unchanged); now a ValueError, as at construction. Their neutral values are accepted."""
    import fastlt

    with pytest.raises(ValueError, match=f"loss='lade' takes no {name}"):
        fastlt.LinearLossHead(4, 3, [5, 3, 1], loss="lade", **{name: value})
    head = fastlt.LinearLossHead(4, 3, [5, 3, 1], loss="lade")
    with pytest.raises(ValueError, match=f"loss='lade' takes no {name}"):
        setattr(head, name, value)
    setattr(head, name, {"s": 1, "gamma": 0, "tau": 1.0}[name])


@pytest.mark.parametrize("make", ["head", "module"])
def test_lade_refuses_reduction_none_when_assigned(make):
    """reduction='none' assigned to a LADE head or LADELoss after construction was accepted, and the next call raised
    (naming LADELoss for a head); now the assignment raises, and the message names the LADE forms."""
    import fastlt

    mod = (fastlt.LinearLossHead(4, 3, [5, 3, 1], loss="lade") if make == "head"
           else fastlt.LADELoss([5, 3, 1]))
    with pytest.raises(ValueError, match=r"reduction='none' is not defined for LADE \(LADELoss, lade_loss, "
                                         r"loss='lade'"):
        mod.reduction = "none"
    assert mod.reduction == "mean"
    mod.reduction = "sum"  # the others still assign
    assert mod.reduction == "sum"


@pytest.mark.parametrize("loss, name, value", [("ce", "tau", 3.0), ("ce", "max_margin", 0.9), ("la", "alpha", 0.5),
                                               ("ldam", "tau", 5.0), ("ldam", "remine_lambda", 1.0),
                                               ("balanced_softmax", "max_margin", 0.2), ("lade", "max_margin", 0.9)])
def test_linear_loss_head_refuses_the_hyperparameters_its_loss_does_not_use(loss, name, value):
    """A head's hyperparameter that its loss does not use (tau for 'ldam' and 'ce', max_margin but for 'ldam',
    alpha and remine_lambda but for 'lade') was accepted, shown in the repr and ignored; now a ValueError naming it,
    at construction and when assigned. The default value is accepted. And logits(adjusted=True) of a loss without a
    prior ('ce', 'ldam') returned the raw logits; now it raises."""
    import fastlt

    counts = [5, 3, 1]
    with pytest.raises(ValueError, match=f"loss='{loss}' takes no {name}"):
        fastlt.LinearLossHead(4, 3, counts, loss=loss, **{name: value})
    head = fastlt.LinearLossHead(4, 3, counts, loss=loss)
    with pytest.raises(ValueError, match=f"loss='{loss}' takes no {name}"):
        setattr(head, name, value)
    setattr(head, name, getattr(head, name))
    if loss in ("ce", "ldam"):
        with pytest.raises(ValueError, match="adjusted=True adds tau"):
            head.logits(torch.randn(2, 4), adjusted=True)
