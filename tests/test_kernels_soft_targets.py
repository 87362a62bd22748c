"""Class-probability targets (mixup, cutmix) on the row kernels against the float64 reference
(fastlt.reference: ``sum_j w_j q'_ij (LSE_i - a_ij)``, margin ``m_j q_ij``, focal ``(1 - sum_j q_ij p_ij)^gamma``,
'mean' over N), every flag, dtype, reduction and tile path; one-hot probabilities give the hard-target kernels'
results."""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, class_vectors, to_device
from test_kernels_adjusted_ce import _flags, _inputs, run_and_compare

import fastlt
from fastlt import functional as LF
from fastlt import heads as H
from fastlt import reference as R
from fastlt.kernels import launch


def _soft(N, C, gen, kind="mixup"):
    """(N, C) float32 class probabilities: mixup pairs (two classes, lam), dense softmax, or one-hot."""
    a = torch.randint(0, C, (N,), generator=gen)
    if kind == "onehot":
        return F.one_hot(a, C).float()
    if kind == "dense":
        return torch.softmax(torch.randn(N, C, generator=gen) * 2.0, 1)
    b = torch.randint(0, C, (N,), generator=gen)
    lam = torch.rand(N, 1, generator=gen)
    return lam * F.one_hot(a, C).float() + (1 - lam) * F.one_hot(b, C).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("flags", ["plain", "la", "ldam", "gcl", "gcl_focal", "weighted_smooth", "all"])
def test_every_flag_dtype_reduction(flags, reduction, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(("soft", flags, reduction, str(dtype))).encode()))
    N, C = 6, 37
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, dtype, gen)
    q = _soft(N, C, gen, "dense" if flags in ("plain", "all") else "mixup")
    run_and_compare(z, q, _flags(flags, cv, seed=int(torch.randint(0, 2**40, (), generator=gen))),
                    reduction=reduction)


@pytest.mark.parametrize("config", [dict(block_n=16, num_splits=1), dict(block_n=16, num_splits=3),
                                    dict(block_n=32, num_splits=2, block_m=2),
                                    dict(block_n=32, num_splits=1, block_m=2, row_programs=2)],
                         ids=["tiles", "split3", "split2x2", "persistent"])
@pytest.mark.parametrize("flags", ["plain", "gcl_focal", "all"])
@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_split_and_multi_tile_paths(config, flags, grad_in_forward):
    gen = torch.Generator().manual_seed(8)
    N, C = 5, 101
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, torch.float32, gen)
    run_and_compare(z, _soft(N, C, gen), _flags(flags, cv, 17), reduction="mean", config=config,
                    grad_in_forward=grad_in_forward)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_in_forward_stored_probabilities(dtype, splits, monkeypatch):
    """STORE_P: the gradient pass scales the stored exp(a - max) and reads the targets' tiles again."""
    monkeypatch.setattr(launch, "STORE_PROBS", "always")
    gen = torch.Generator().manual_seed(14)
    N, C = 7, 50
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, dtype, gen)
    for flags in ("la", "all"):
        run_and_compare(z, _soft(N, C, gen, "dense"), _flags(flags, cv, 3), reduction="none", grad_in_forward=True,
                        config=dict(block_n=16, num_splits=splits))


@pytest.mark.parametrize("N,C", [(1, 1), (1, 7), (3, 2), (4, 1000)])
def test_odd_shapes(N, C):
    gen = torch.Generator().manual_seed(N * 7 + C)
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, torch.float32, gen)
    run_and_compare(z, _soft(N, C, gen, "dense"), _flags("all", cv, seed=5))


@pytest.mark.parametrize("flags", ["plain", "ldam", "gcl_focal", "weighted_smooth", "all"])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_one_hot_probabilities_equal_the_hard_target_kernels(flags, reduction):
    """One-hot class probabilities: the same loss and gradient as the class indices, to float32 rounding (the two
    kernels sum in other orders). 'mean' differs by definition when classes are weighted (N vs sum_i w_{y_i})."""
    gen = torch.Generator().manual_seed(21)
    N, C = 6, 45
    cv = class_vectors(C, gen)
    z, y = _inputs(N, C, torch.float32, gen, ignore_rows=())
    kw = to_device(_flags(flags, cv, 9))
    grads = []
    for target in (y, F.one_hot(y, C).float()):
        zk = z.to(DEVICE).requires_grad_()
        loss = LF.adjusted_cross_entropy(zk, target.to(DEVICE), reduction=reduction, backend="triton", **kw)
        loss.sum().backward()
        grads.append((loss.detach(), zk.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("q_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_target_dtypes_and_a_transposed_target(q_dtype):
    """The kernels read the targets in their own dtype and strides."""
    gen = torch.Generator().manual_seed(4)
    N, C = 6, 29
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, torch.float32, gen)
    q = _soft(N, C, gen, "dense").to(q_dtype)
    run_and_compare(z, q, _flags("all", cv, 2))
    qt = q.t().contiguous().t()
    assert not qt.is_contiguous()
    run_and_compare(z, qt, _flags("ldam", cv, 2), reduction="none")


def test_rows_without_mass_and_an_empty_batch():
    """A row of zeros costs nothing and gets no gradient; 'mean' still divides by N; no rows: NaN as torch."""
    gen = torch.Generator().manual_seed(6)
    z, _ = _inputs(4, 9, torch.float32, gen)
    q = _soft(4, 9, gen, "dense")
    q[2] = 0.0
    run_and_compare(z, q, {}, reduction="mean")
    empty = LF.adjusted_cross_entropy(torch.zeros(0, 9, device=DEVICE), torch.zeros(0, 9, device=DEVICE),
                                      backend="triton")
    assert torch.isnan(empty)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_class_masked_with_minus_inf_and_no_mass(backend, label_smoothing):
    """A class masked with -inf that the row's probabilities do not target: NaN without smoothing (0 * -inf), as
    F.cross_entropy gives; with smoothing every class has mass and the loss is +inf, as F.cross_entropy's (the
    reference gave NaN: it added the smoothing term apart from the targets' 0 * -inf)."""
    z = torch.tensor([[1.0, 2.0, -float("inf"), 0.5], [0.3, -0.2, 0.1, 0.0]], device=DEVICE)
    q = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], device=DEVICE)
    for weight in (None, torch.tensor([1.0, 2.0, 0.5, 1.5], device=DEVICE)):
        expected = F.cross_entropy(z.double(), q.double(), weight=None if weight is None else weight.double(),
                                   label_smoothing=label_smoothing, reduction="none")
        got = LF.adjusted_cross_entropy(z, q, weight=weight, label_smoothing=label_smoothing, reduction="none",
                                        backend=backend)
        assert bool(torch.isnan(expected[0])) == (label_smoothing == 0.0)
        assert bool(torch.isinf(expected[0])) == (label_smoothing > 0.0)
        torch.testing.assert_close(got.double(), expected, equal_nan=True)


def test_bad_probability_targets():
    z = torch.randn(3, 5, device=DEVICE)
    with pytest.raises(ValueError, match="logits' shape"):
        LF.adjusted_cross_entropy(z, torch.rand(3, 4, device=DEVICE), backend="triton")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="non-negative"):
            LF.adjusted_cross_entropy(z, -torch.rand(3, 5), backend="triton")
    with pytest.raises(ValueError, match="logits' shape"):
        LF.adjusted_cross_entropy(z.cpu().double(), torch.rand(3, 5, 1).double(), backend="torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_lade_with_probability_targets(dtype, reduction):
    """LADE's statistics weigh the classes by q (N_c = sum_i q_ic, sum_i q_ic z_ic); every row counts."""
    gen = torch.Generator().manual_seed(31)
    N, C = 7, 40
    cv = class_vectors(C, gen)
    z, _ = _inputs(N, C, dtype, gen)
    q = _soft(N, C, gen)
    pi = torch.softmax(cv["log_prior"].double(), 0)
    zk = z.to(DEVICE).detach().requires_grad_()
    loss = LF.lade_loss(zk, q.to(DEVICE), pi.to(DEVICE).float(), 0.3, 0.1, weight=cv["weight"].to(DEVICE),
                        label_smoothing=0.1, reduction=reduction, backend="triton")
    loss.backward()
    z64 = z.double().requires_grad_()
    want = R.lade_loss(z64, q.double(), pi, 0.3, 0.1, weight=cv["weight"].double(), label_smoothing=0.1,
                       reduction=reduction)
    want.backward()
    tol = dict(rtol=3e-2, atol=3e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.cpu().double(), want.detach(), **tol)
    torch.testing.assert_close(zk.grad.cpu().double(), z64.grad, **tol)


@pytest.mark.parametrize("head", ["linear", "cosine_gcl", "lade"])
@pytest.mark.parametrize("chunks", [{}, dict(chunk_rows=3), dict(chunk_classes=16)], ids=["whole", "rows", "classes"])
def test_heads_with_probability_targets(head, chunks):
    """The fused heads read each chunk's targets (rows, or the class chunk's columns) against the dense oracle."""
    gen = torch.Generator().manual_seed(23)
    N, D, C = 7, 6, 37
    cv = class_vectors(C, gen)
    f = torch.randn(N, D, generator=gen)
    w = torch.randn(C, D, generator=gen)
    b = torch.randn(C, generator=gen)
    q = _soft(N, C, gen, "dense")
    pi = torch.softmax(cv["log_prior"], 0)
    kw64 = dict(reduction="sum")
    if head == "linear":
        def run(f, w, q, backend, **k):
            dt = f.dtype
            return H.linear_cross_entropy(f, w, q, b.to(f), log_prior=cv["log_prior"].to(f), tau=0.5,
                                          weight_classes=cv["weight"].to(dt), label_smoothing=0.1, backend=backend,
                                          **k, **kw64)
    elif head == "cosine_gcl":
        def run(f, w, q, backend, **k):
            return H.cosine_cross_entropy(f, w, q, cloud=cv["cloud"].to(f), noise_mul=0.0, margin=0.2, scale=8.0,
                                          gamma=1.0, backend=backend, **k, **kw64)
    else:
        def run(f, w, q, backend, **k):
            return H.lade_linear_loss(f, w, q, pi.to(f), b.to(f), weight_classes=cv["weight"].to(f), backend=backend,
                                      **k, **kw64)
    fk, wk = f.to(DEVICE).detach().requires_grad_(), w.to(DEVICE).detach().requires_grad_()
    got = run(fk, wk, q.to(DEVICE), "triton", **chunks)
    got.backward()
    f64, w64 = f.double().requires_grad_(), w.double().requires_grad_()
    want = run(f64, w64, q.double(), "torch")
    want.backward()
    torch.testing.assert_close(got.cpu().double(), want.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(fk.grad.cpu().double(), f64.grad, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(wk.grad.cpu().double(), w64.grad, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_module_takes_probability_targets(backend):
    """The loss modules and heads with mixup targets (and K-dim probabilities) on both backends agree with the
    float64 reference; at the identity setting the loss is F.cross_entropy's."""
    gen = torch.Generator().manual_seed(2)
    N, C, D = 6, 11, 5
    counts = torch.randint(1, 100, (C,), generator=gen)
    dev = DEVICE if backend == "triton" else "cpu"
    z = torch.randn(N, C, generator=gen).to(dev)
    q = _soft(N, C, gen).to(dev)
    plain = fastlt.LogitAdjustedLoss(counts, tau=0.0, backend=backend).to(dev)
    torch.testing.assert_close(plain(z, q), F.cross_entropy(z, q), rtol=1e-5, atol=1e-6)
    for crit, kw in ((fastlt.BalancedSoftmaxLoss(counts, backend=backend), {}),
                     (fastlt.LDAMLoss(counts, backend=backend), {}),
                     (fastlt.GCLLoss(counts, backend=backend), dict(seed=3)),
                     (fastlt.LADELoss(counts, backend=backend), {})):
        got = crit.to(dev)(z, q, **kw)
        assert torch.isfinite(got)
        want = crit.double().to(dev)(z.double(), q.double(), **kw) if backend == "torch" else None
        if want is not None:
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    z4 = torch.randn(2, C, 3, 2, generator=gen).to(dev)
    q4 = torch.softmax(torch.randn(2, C, 3, 2, generator=gen), 1).to(dev)
    torch.testing.assert_close(plain(z4, q4), F.cross_entropy(z4, q4), rtol=1e-5, atol=1e-6)
    head = fastlt.LinearLossHead(D, C, counts, loss="la", backend=backend).to(dev)
    feats = torch.randn(N, D, generator=gen).to(dev)
    want = F.cross_entropy(head.logits(feats, adjusted=True), q)
    torch.testing.assert_close(head(feats, q), want, rtol=1e-5, atol=1e-5)
    cosine = fastlt.CosineGCLHead(D, C, counts, noise_mul=0.0, backend=backend).to(dev)
    assert torch.isfinite(cosine(feats, q))
