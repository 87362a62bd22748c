"""The fused linear / cosine classifier heads (fastlt.heads) against the float64 oracle
(docs/design.md, Fused heads, Tests).

The fused path (``backend='triton'``: chunked matmuls + the row-operator kernel, gradient in forward) is
compared with the unfused oracles ``reference_linear_cross_entropy`` / ``reference_cosine_cross_entropy``
run in float64 and in the test dtype (:func:`oracle.assert_oracle_close`), for the loss and for the
gradients of features, weight and bias. Without a GPU the kernels run in the Triton interpreter on CPU
tensors (conftest sets TRITON_INTERPRET=1); with one they run natively on CUDA. Shapes stay small.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, DTYPES, INTERPRETER_BF16_TO_NEAREST, class_vectors, long_tail_counts, to_device
from oracle import FLOOR, assert_oracle_close

import fastlt
from fastlt import functional as LF
from fastlt import heads as H
from fastlt import reference as R
from fastlt.priors import gcl_cloud, ldam_margins, log_prior

HEADS = ["linear_bias", "linear", "cosine"]
FLAGS = ["plain", "la", "la_half", "ldam", "scalar_margin", "gcl", "gcl_focal", "weighted_smooth", "all"]


# --- helpers ---------------------------------------------------------------------------------------------------

def _flags(name: str, cv: dict, seed: int) -> dict:
    return {
        "plain": {},
        "la": dict(log_prior=cv["log_prior"], tau=1.0),
        "la_half": dict(log_prior=cv["log_prior"], tau=0.5),
        "ldam": dict(margin=cv["margins"], scale=30.0),
        "scalar_margin": dict(margin=0.3, scale=16.0),
        "gcl": dict(cloud=cv["cloud"], noise_mul=1.0, seed=seed, margin=0.5, scale=30.0),
        "gcl_focal": dict(cloud=cv["cloud"], noise_mul=0.5, seed=seed, margin=0.1, scale=20.0, gamma=1.0),
        "weighted_smooth": dict(log_prior=cv["log_prior"], weight_classes=cv["weight"], label_smoothing=0.15),
        "all": dict(log_prior=cv["log_prior"], tau=0.7, cloud=cv["cloud"], noise_mul=0.5, seed=seed,
                    margin=cv["margins"], scale=8.0, gamma=2.0, weight_classes=cv["weight"], label_smoothing=0.1),
    }[name]


def _inputs(N, D, C, gen, *, cosine=False, bias=True, ignore_rows=(1,)):
    """float64 CPU features, weight, bias (or None) and targets (rows in ``ignore_rows`` set to -100)."""
    f = torch.randn(N, D, generator=gen, dtype=torch.float64)
    w = torch.randn(C, D, generator=gen, dtype=torch.float64) * (1.0 if cosine else 1.0 / math.sqrt(D))
    b = torch.randn(C, generator=gen, dtype=torch.float64) * 0.5 if bias and not cosine else None
    y = torch.randint(0, C, (N,), generator=gen)
    for r in ignore_rows:
        if r < N:
            y[r] = -100
    return f, w, b, y


def _fused(cosine: bool, f, w, b, y, kw, **extra):
    if cosine:
        return LF.cosine_cross_entropy(f, w, y, backend="triton", **kw, **extra)
    return LF.linear_cross_entropy(f, w, y, b, backend="triton", **kw, **extra)


def _reference(cosine: bool, f, w, b, y, kw, **extra):
    if cosine:
        return H.reference_cosine_cross_entropy(f, w, y, **kw, **extra)
    return H.reference_linear_cross_entropy(f, w, y, b, **kw, **extra)


def _backward(loss, reduction, gen):
    """grad_output != 1: a random vector for 'none', x2.5 for 'mean'/'sum'. Returns it (float64) for the refs."""
    if reduction == "none":
        go = (torch.randn(loss.shape, generator=gen, dtype=torch.float64) * 1.7 + 0.5).to(loss.dtype)
        loss.backward(go.to(loss.device))
        return go.to(torch.float64)
    (loss * 2.5).backward()
    return None


def _ref_backward(loss, go, reduction):
    if reduction == "none":
        loss.backward(go.to(loss.dtype))
    else:
        (loss * 2.5).backward()


def _reference_on_rounded_logits(cosine, leaves64, y, kw64, dtype, *, reduction, eps=1e-12):
    """The float64 operator applied to the logits rounded to ``dtype`` (as both the fused head and the unfused
    pipeline hold them), gradients by float64 autograd through the exact logits: the error every
    ``dtype`` head has, which the scale ``s`` amplifies (it is then larger than the same-dtype reference's
    own rounding, by chance)."""
    f, w, b = (leaves64 + [None])[:3]
    if cosine:
        exact = F.linear(F.normalize(f, dim=1, eps=eps), F.normalize(w, dim=1, eps=eps))
        rounded = F.linear(*(F.normalize(t.detach().to(dtype).float(), dim=1, eps=eps).to(dtype) for t in (f, w)))
    else:
        exact = F.linear(f, w, b)
        rounded = F.linear(f.detach().to(dtype), w.detach().to(dtype), None if b is None else b.detach().to(dtype))
    z = exact + (rounded.to(torch.float64) - exact).detach()
    kw64 = {("weight" if k == "weight_classes" else k): v for k, v in kw64.items()}
    return R.adjusted_cross_entropy(z, y, reduction=reduction, **kw64)


def _assert_close(got, ref64, same_dtype: list, dtype, *, factor, what):
    """assert_oracle_close against the same-dtype baseline that is further from float64."""
    def err(t):
        d = (t.detach().to(torch.float64) - ref64.detach())[~torch.isnan(ref64)]
        return d.abs().max().item() if d.numel() else 0.0

    same = max(same_dtype, key=err)
    if DEVICE == "cpu" and dtype == torch.bfloat16 and not INTERPRETER_BF16_TO_NEAREST:
        # A Triton interpreter that conftest could not patch converts fp32 -> bf16 by truncation (round toward zero),
        # not the GPU's round-to-nearest-even: each stored dZ element is off by up to one ulp, all in one direction,
        # and the sums over rows (dW, db) add them up. Allow twice the one-rounding floor there.
        ref = ref64.detach().to(torch.float64).cpu()
        finite = ~torch.isnan(ref)
        assert torch.isnan(got.detach().cpu()).eq(~finite).all(), f"{what}: NaN pattern differs"
        if finite.any():
            scale = max(1.0, ref[finite].abs().max().item())
            bound = factor * err(same) + 2 * FLOOR[dtype] * scale
            e = (got.detach().to(torch.float64).cpu() - ref)[finite].abs().max().item()
            assert e <= bound, f"{what}: error {e:.3e} > bound {bound:.3e} (same-dtype error {err(same):.3e})"
        return
    assert_oracle_close(got, ref64, same, dtype, factor=factor, what=what)


def run_and_compare(f, w, b, y, dtype, kw, *, cosine=False, reduction="mean", chunk_rows=None, factor=2.0,
                    extra=None, seed=0):
    """Fused head vs float64 reference vs same-dtype baselines (the reference run in ``dtype``, and the float64
    operator on the ``dtype``-rounded logits): loss, dF, dW and db. Returns the fused loss and gradients
    (detached, on the CPU)."""
    extra = extra or {}
    gen = torch.Generator().manual_seed(seed)
    base = [t.to(dtype) for t in (f, w, b) if t is not None]  # the inputs, rounded to the test dtype

    leaves = [t.to(DEVICE, copy=True).requires_grad_() for t in base]
    fk, wk, bk = (leaves + [None])[:3]
    loss = _fused(cosine, fk, wk, bk, y.to(DEVICE), to_device(kw), reduction=reduction, chunk_rows=chunk_rows, **extra)
    assert loss.dtype == dtype
    go = _backward(loss, reduction, gen)

    l64 = [t.to(torch.float64).requires_grad_() for t in base]
    f64, w64, b64 = (l64 + [None])[:3]
    ref64 = _reference(cosine, f64, w64, b64, y, to_device(kw, torch.float64, "cpu"), reduction=reduction, **extra)
    _ref_backward(ref64, go, reduction)
    ls = [t.clone().requires_grad_() for t in base]
    fs, ws, bs = (ls + [None])[:3]
    ref_same = _reference(cosine, fs, ws, bs, y, to_device(kw, dtype, "cpu"), reduction=reduction, **extra)
    _ref_backward(ref_same, go, reduction)
    lr = [t.to(torch.float64).requires_grad_() for t in base]
    ref_round = _reference_on_rounded_logits(cosine, lr, y, to_device(kw, torch.float64, "cpu"), dtype,
                                             reduction=reduction, **extra)
    _ref_backward(ref_round, go, reduction)

    _assert_close(loss, ref64, [ref_same, ref_round], dtype, factor=factor, what="loss")
    for name, lk, l6, lsame, lround in zip(("dF", "dW", "db")[:len(leaves)], leaves, l64, ls, lr, strict=True):
        assert lk.grad is not None and lk.grad.dtype == dtype and lk.grad.shape == lk.shape, name
        _assert_close(lk.grad, l6.grad, [lsame.grad, lround.grad], dtype, factor=factor, what=name)
    return loss.detach().cpu(), [lk.grad.cpu() for lk in leaves]


# --- the fused path against the oracle ---------------------------------------------------------------------------

@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("flags", FLAGS)
def test_every_flag_dtype_reduction(flags, reduction, dtype, head):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{flags}-{reduction}-{dtype}-{head}".encode()))
    N, D, C = 6, 12, 37
    cosine = head == "cosine"
    cv = class_vectors(C, gen)
    f, w, b, y = _inputs(N, D, C, gen, cosine=cosine, bias=head == "linear_bias")
    kw = _flags(flags, cv, seed=int(torch.randint(0, 2**40, (), generator=gen)))
    # chunks of 4 rows: two chunks, the second partial (4 does not divide 6)
    run_and_compare(f, w, b, y, dtype, kw, cosine=cosine, reduction=reduction, chunk_rows=4, seed=N)


@pytest.mark.parametrize("N,D,C,chunk_rows", [(1, 1, 1, None), (1, 5, 7, None), (3, 4, 7, None), (3, 1, 7, 2),
                                              (3, 8, 1000, 2), (17, 6, 5, 4), (10, 3, 2, 3), (5, 9, 1, 1)])
@pytest.mark.parametrize("flags", ["plain", "all"])
@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_odd_shapes(N, D, C, chunk_rows, flags, head):
    gen = torch.Generator().manual_seed(N * 100003 + D * 101 + C)
    cosine = head == "cosine"
    cv = class_vectors(C, gen)
    f, w, b, y = _inputs(N, D, C, gen, cosine=cosine, ignore_rows=(1,) if N > 1 else ())
    run_and_compare(f, w, b, y, torch.float32, _flags(flags, cv, seed=5), cosine=cosine, chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_chunking_does_not_change_the_result(head, reduction, dtype):
    """The GCL noise of row i is drawn from the global row i: every chunking gives the same loss and grads
    (only the matmul rounding may differ), and each of them matches the oracle."""
    gen = torch.Generator().manual_seed(21)
    N, D, C = 9, 8, 31
    cosine = head == "cosine"
    cv = class_vectors(C, gen)
    f, w, b, y = _inputs(N, D, C, gen, cosine=cosine)
    kw = _flags("all", cv, seed=987654321)
    kw["scale"] = 30.0  # make the noise matter
    results = {rows: run_and_compare(f, w, b, y, dtype, kw, cosine=cosine, reduction=reduction, chunk_rows=rows)
               for rows in (None, 1, 2, 4, 9, 64)}
    # (chunks of other sizes may round the matmuls differently, which s = 30 amplifies; the noise of a wrong
    # row would change the result by O(1))
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    loss0, grads0 = results[None]
    for rows, (loss, grads) in results.items():
        torch.testing.assert_close(loss, loss0, **tol, msg=f"chunk_rows={rows}")
        for g, g0 in zip(grads, grads0, strict=True):
            torch.testing.assert_close(g, g0, **tol, msg=f"chunk_rows={rows}")
    # and the noise does matter: another seed changes the row losses
    args = [t if t is None else t.to(DEVICE, torch.float32) for t in (f, w, b)]
    same, other = (_fused(cosine, *args, y.to(DEVICE), to_device({**kw, "seed": s}), reduction="none", chunk_rows=4)
                   for s in (kw["seed"], 5))
    assert (same - other).abs().max() > 1e-2


@pytest.mark.parametrize("chunk_classes", [None, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_uninitialised_memory_is_never_read(monkeypatch, dtype, chunk_classes):
    """Every ``torch.empty`` is filled with NaN (what leftover memory may hold): the heads' loss and gradients do
    not change, so no buffer is read before it is written, padding included (torch's CPU bf16 matmul reads the
    padding of a padded-row view: the chunk buffers are zeroed on the CPU). C = 129 pads rows to 192."""
    gen = torch.Generator().manual_seed(8)
    N, D, C = 40, 8, 129
    f, w, b, y = (t if t is None else t.to(DEVICE) for t in _inputs(N, D, C, gen, cosine=False))

    def step():
        leaves = [t.to(dtype).requires_grad_() for t in (f, w, b)]
        loss = LF.linear_cross_entropy(*leaves[:2], y, leaves[2], backend="triton", chunk_classes=chunk_classes)
        loss.backward()
        return [loss.detach()] + [t.grad for t in leaves]

    clean = step()
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(make):
        def alloc(*args, **kwargs):
            t = make(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t
        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
    for got, want in zip(step(), clean, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_reference_seed_noise_matches_the_kernel():
    """Given only seed=, the oracle draws the same Philox noise as the kernel (to float32 rounding)."""
    gen = torch.Generator().manual_seed(2)
    N, D, C = 7, 6, 45
    cv = class_vectors(C, gen)
    f, w, _, y = _inputs(N, D, C, gen, cosine=True)
    kw = _flags("gcl", cv, seed=2**40 + 11)
    got = LF.cosine_cross_entropy(f.float().to(DEVICE), w.float().to(DEVICE), y.to(DEVICE), backend="triton",
                                  reduction="none", chunk_rows=3, **to_device(kw))
    ref = H.reference_cosine_cross_entropy(f, w, y, reduction="none", **to_device(kw, torch.float64, "cpu"))
    torch.testing.assert_close(got.cpu().double(), ref, atol=2e-4, rtol=1e-5)
    plain = H.reference_cosine_cross_entropy(f, w, y, reduction="none", **to_device({**kw, "noise_mul": 0.0},
                                                                                torch.float64, "cpu"))
    assert (got.cpu().double() - plain)[y != -100].abs().max() > 1e-2  # the noise is really applied


def test_noise_seed_none_follows_torch_manual_seed():
    gen = torch.Generator().manual_seed(3)
    N, D, C = 5, 4, 20
    cv = class_vectors(C, gen)
    f, w, _, y = _inputs(N, D, C, gen, cosine=True)
    kw = to_device(dict(cloud=cv["cloud"], noise_mul=1.0, margin=0.5, scale=30.0))
    fk, wk, yk = f.float().to(DEVICE), w.float().to(DEVICE), y.to(DEVICE)
    outs = []
    for _ in range(2):
        torch.manual_seed(1234)
        outs.append(LF.cosine_cross_entropy(fk, wk, yk, backend="triton", reduction="none", **kw))
    assert torch.equal(outs[0], outs[1])
    torch.manual_seed(999)
    assert not torch.allclose(LF.cosine_cross_entropy(fk, wk, yk, backend="triton", reduction="none", **kw),
                              outs[0])


@pytest.mark.parametrize("eps", [1e-12, 0.1])
def test_cosine_zero_and_tiny_rows(eps):
    """Tiny rows (norm 0.01: above eps=1e-12, the gradient scales as 1/|x|) and, with eps=0.1, rows below eps
    (a zero row, a tiny one: F.normalize's clamp, no projection in the backward), in features and weight."""
    gen = torch.Generator().manual_seed(6)
    N, D, C = 5, 7, 11
    cv = class_vectors(C, gen)
    f, w, _, y = _inputs(N, D, C, gen, cosine=True, ignore_rows=())
    f[2] *= 0.01 / f[2].norm()
    w[5] *= 0.01 / w[5].norm()
    if eps > 0.01:
        f[0] = 0.0
        w[3] = 0.0
    run_and_compare(f, w, None, y, torch.float32, _flags("la", cv, 0), cosine=True, chunk_rows=2,
                    extra=dict(eps=eps))


@pytest.mark.parametrize("chunks", [dict(chunk_rows=2), dict(chunk_classes=8)], ids=["rows", "classes"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_all_rows_ignored_and_empty_batch(reduction, head, chunks):
    cosine = head == "cosine"
    D, C = 4, 5
    for N in (0, 3):
        gen = torch.Generator().manual_seed(N)
        f, w, b, _ = _inputs(N, D, C, gen, cosine=cosine)
        y = torch.full((N,), -100, dtype=torch.long)
        leaves = [t.float().to(DEVICE).requires_grad_() for t in (f, w, b) if t is not None]
        fk, wk, bk = (leaves + [None])[:3]
        got = _fused(cosine, fk, wk, bk, y.to(DEVICE), {}, reduction=reduction, **chunks)
        logits = (F.normalize(f, dim=1) @ F.normalize(w, dim=1).t()) if cosine else F.linear(f, w, b)
        want = F.cross_entropy(logits.float(), y, reduction=reduction)
        torch.testing.assert_close(got.cpu(), want, equal_nan=True)
        if reduction == "mean":
            assert torch.isnan(got).item()
        got.sum().backward()
        for t in leaves:  # 'mean' too: zero gradients as torch's, not NaN from 1 / sum w = inf
            assert t.grad is not None and (t.grad == 0).all()


def test_custom_ignore_index_and_int32_targets():
    gen = torch.Generator().manual_seed(8)
    N, D, C = 9, 5, 12
    f, w, b, y = _inputs(N, D, C, gen, ignore_rows=())
    y[[2, 5]] = 3  # ignore the rows of class 3
    got = LF.linear_cross_entropy(f.float().to(DEVICE), w.float().to(DEVICE), y.to(DEVICE, torch.int32),
                                  b.float().to(DEVICE), ignore_index=3, backend="triton", chunk_rows=4)
    want = F.cross_entropy(F.linear(f, w, b), y, ignore_index=3)
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("layout", ["transposed", "row_stride"])
@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_non_contiguous_features_and_weight(layout, head):
    """Views as a layer would hand them: a transposed (column-major) tensor or a column slice."""
    gen = torch.Generator().manual_seed(5)
    N, D, C = 7, 6, 13
    cosine = head == "cosine"
    cv = class_vectors(C, gen)
    kw = _flags("all", cv, seed=11)

    def views(dtype, device):
        if layout == "transposed":
            fb = torch.randn(D, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            wb = torch.randn(D, C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            bb = torch.randn(C, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            leaves = [t.to(device, dtype).requires_grad_() for t in (fb, wb, bb)]
            return leaves, (leaves[0].t(), leaves[1].t(), leaves[2][:, 1])
        fb = torch.randn(N, D + 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        wb = torch.randn(C, D + 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        bb = torch.randn(2 * C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        leaves = [t.to(device, dtype).requires_grad_() for t in (fb, wb, bb)]
        return leaves, (leaves[0][:, 2:2 + D], leaves[1][:, :D], leaves[2][::2])

    leaves, (fk, wk, bk) = views(torch.float32, DEVICE)
    assert not fk.is_contiguous() and not wk.is_contiguous() and not bk.is_contiguous()
    y = torch.randint(0, C, (N,), generator=gen)
    loss = _fused(cosine, fk, wk, bk, y.to(DEVICE), to_device(kw), chunk_rows=3)
    (loss * 2.5).backward()

    l64, (f64, w64, b64) = views(torch.float64, "cpu")
    ref = _reference(cosine, f64, w64, b64, y, to_device(kw, torch.float64, "cpu"))
    (ref * 2.5).backward()
    torch.testing.assert_close(loss.double().cpu(), ref, atol=1e-5, rtol=1e-5)
    for lk, l6 in zip(leaves[:2] if cosine else leaves, l64[:2] if cosine else l64, strict=True):
        torch.testing.assert_close(lk.grad.double().cpu(), l6.grad, atol=1e-5, rtol=1e-4)
    if cosine:
        assert leaves[2].grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_no_grad_paths_give_the_same_loss(reduction, head):
    gen = torch.Generator().manual_seed(12)
    N, D, C = 6, 5, 17
    cosine = head == "cosine"
    cv = class_vectors(C, gen)
    f, w, b, y = _inputs(N, D, C, gen, cosine=cosine)
    kw = to_device(_flags("all", cv, seed=3))
    plain = [t.float().to(DEVICE) for t in (f, w, b) if t is not None]
    fk, wk, bk = (plain + [None])[:3]
    yk = y.to(DEVICE)
    leaves = [t.clone().requires_grad_() for t in plain]
    with_grad = _fused(cosine, *(leaves + [None])[:3], yk, kw, reduction=reduction, chunk_rows=4)
    assert with_grad.requires_grad
    no_req = _fused(cosine, fk, wk, bk, yk, kw, reduction=reduction, chunk_rows=4)
    with torch.no_grad():
        no_grad = _fused(cosine, *(leaves + [None])[:3], yk, kw, reduction=reduction, chunk_rows=4)
    assert not no_req.requires_grad and not no_grad.requires_grad
    torch.testing.assert_close(no_req, with_grad.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(no_grad, with_grad.detach(), atol=1e-6, rtol=1e-6)
    ref = _reference(cosine, *[t if t is None else t.double() for t in (f, w, b)], y,
                     to_device(_flags("all", cv, seed=3), torch.float64, "cpu"),
                     reduction=reduction)
    torch.testing.assert_close(no_req.double().cpu(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which", ["features", "weight", "bias", "features+bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_partial_requires_grad(which, reduction):
    """Only some inputs need a gradient (a frozen backbone or a frozen classifier)."""
    gen = torch.Generator().manual_seed(13)
    N, D, C = 6, 5, 9
    cv = class_vectors(C, gen)
    f, w, b, y = _inputs(N, D, C, gen)
    kw = _flags("la", cv, seed=0)
    names = ("features", "weight", "bias")
    ts = [t.float().to(DEVICE).requires_grad_(n in which.split("+")) for n, t in zip(names, (f, w, b), strict=True)]
    loss = LF.linear_cross_entropy(ts[0], ts[1], y.to(DEVICE), ts[2], backend="triton", reduction=reduction,
                                   chunk_rows=4, **to_device(kw))
    loss.sum().backward()
    r = [t.clone().requires_grad_() for t in (f, w, b)]
    H.reference_linear_cross_entropy(r[0], r[1], y, r[2], reduction=reduction,
                                     **to_device(kw, torch.float64, "cpu")).sum().backward()
    for n, t, t64 in zip(names, ts, r, strict=True):
        if n in which.split("+"):
            torch.testing.assert_close(t.grad.double().cpu(), t64.grad, atol=1e-6, rtol=1e-5)
        else:
            assert t.grad is None


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_double_backward_raises_for_gradient_in_forward(reduction, head):
    gen = torch.Generator().manual_seed(14)
    cosine = head == "cosine"
    f, w, b, y = _inputs(4, 3, 5, gen, cosine=cosine)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (f, w, b) if t is not None]
    loss = _fused(cosine, *(leaves + [None])[:3], y.to(DEVICE), {}, reduction=reduction)
    loss.backward(retain_graph=True)
    first = leaves[0].grad.clone()
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()
    assert torch.equal(leaves[0].grad, first)


def test_double_backward_recomputes_for_reduction_none():
    gen = torch.Generator().manual_seed(15)
    f, w, b, y = _inputs(5, 4, 6, gen)
    leaves = [t.float().to(DEVICE).requires_grad_() for t in (f, w, b)]
    loss = LF.linear_cross_entropy(*leaves[:2], y.to(DEVICE), leaves[2], backend="triton", reduction="none",
                                   chunk_rows=2)
    go = torch.linspace(-1.0, 2.0, 5, device=DEVICE)
    loss.backward(go, retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    loss.backward(go)
    for t, g in zip(leaves, first, strict=True):
        torch.testing.assert_close(t.grad, 2 * g)


@pytest.mark.parametrize("head", ["linear_bias", "cosine"])
def test_autocast(head):
    """Under autocast the head runs in the autocast dtype and returns a float32 loss (as nn.CrossEntropyLoss does
    there); the gradients reach the fp32 leaves."""
    gen = torch.Generator().manual_seed(16)
    cosine = head == "cosine"
    N, D, C = 6, 8, 10
    cv = class_vectors(C, gen)
    f, w, b, y = _inputs(N, D, C, gen, cosine=cosine)
    kw = to_device(_flags("la", cv, 0))
    leaves32 = [t.float().to(DEVICE).requires_grad_() for t in (f, w, b) if t is not None]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = _fused(cosine, *(leaves32 + [None])[:3], y.to(DEVICE), kw, chunk_rows=4)
    assert loss.dtype == torch.float32
    loss.backward()
    leaves16 = [t.detach().to(torch.bfloat16).requires_grad_() for t in leaves32]
    want = _fused(cosine, *(leaves16 + [None])[:3], y.to(DEVICE), kw, chunk_rows=4)
    want.backward()
    torch.testing.assert_close(loss, want.float(), rtol=8e-3, atol=8e-3)  # (want rounded to bf16)
    for a, b16 in zip(leaves32, leaves16, strict=True):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b16.grad.float(), atol=1e-5, rtol=1.6e-2)


# --- modules -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["ce", "la", "balanced_softmax", "ldam"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_loss_head_triton_matches_torch_and_the_formula(loss, bias):
    gen = torch.Generator().manual_seed(17)
    N, D, C = 9, 10, 23
    counts = long_tail_counts(C, gen)
    wc = torch.rand(C, generator=gen) + 0.2
    common = dict(loss=loss, bias=bias, tau=0.7 if loss == "la" else 1.0, gamma=0.5,
                  weight_classes=wc, label_smoothing=0.05, chunk_rows=4)
    head = fastlt.LinearLossHead(D, C, counts, backend="triton", **common).to(DEVICE)
    ref = fastlt.LinearLossHead(D, C, counts, backend="torch", **common)
    ref.load_state_dict(head.state_dict())
    ref.to(DEVICE)
    f = torch.randn(N, D, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    y[2] = -100
    fk, fr = f.to(DEVICE, copy=True).requires_grad_(), f.to(DEVICE, copy=True).requires_grad_()
    lk = head(fk, y.to(DEVICE))
    lr = ref(fr, y.to(DEVICE))
    (lk * 1.5).backward()
    (lr * 1.5).backward()
    torch.testing.assert_close(lk, lr, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fk.grad, fr.grad, atol=1e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(head.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert (head.bias is not None) == bias

    # the module's loss is the one it names (independent of the module's own wiring)
    tau = 0.7 if loss == "la" else 1.0
    z = F.linear(f.double(), head.weight.detach().double().cpu(),
                 None if head.bias is None else head.bias.detach().double().cpu())
    kw = dict(gamma=0.5, weight=wc.double(), label_smoothing=0.05)
    if loss in ("la", "balanced_softmax"):
        kw.update(log_prior=log_prior(counts, dtype=torch.float64), tau=tau)
    elif loss == "ldam":
        kw.update(margin=ldam_margins(counts, 0.5, dtype=torch.float64), scale=30.0)
    want = R.adjusted_cross_entropy(z, y, **kw)
    torch.testing.assert_close(lk.double().cpu(), want, atol=2e-5, rtol=1e-5)
    assert head.tau == tau and head.s == (30.0 if loss == "ldam" else 1.0)


@pytest.mark.parametrize("loss", ["ce", "la", "balanced_softmax", "ldam"])
def test_linear_loss_head_logits_and_topk(loss):
    gen = torch.Generator().manual_seed(18)
    N, D, C = 11, 6, 19
    counts = long_tail_counts(C, gen)
    head = fastlt.LinearLossHead(D, C, counts if loss != "ce" else None, loss=loss,
                                **({"tau": 0.6} if loss == "la" else {})).to(DEVICE)
    f = torch.randn(N, D, generator=gen).to(DEVICE)
    z = head.logits(f)
    want = F.linear(f.double(), head.weight.double(), head.bias.double())
    torch.testing.assert_close(z.double(), want, atol=1e-6, rtol=1e-6)
    if loss in ("la", "balanced_softmax"):
        za = head.logits(f, adjusted=True)
        tau = 1.0 if loss == "balanced_softmax" else 0.6
        shift = (tau * log_prior(counts, dtype=torch.float64)).to(DEVICE)
        torch.testing.assert_close(za.double(), want + shift, atol=1e-5, rtol=1e-6)
        assert not torch.allclose(za, z)
    else:  # no prior to add (it returned the raw logits)
        with pytest.raises(ValueError, match="adjusted=True adds tau"):
            head.logits(f, adjusted=True)
    for k, rows in [(1, None), (3, 2), (3, 4), (C, 5), (5, 100)]:
        values, indices = head.topk(f, k, chunk_rows=rows)
        tv, ti = torch.topk(z, k, dim=1)
        assert values.shape == (N, k) and indices.dtype == torch.int64 and not values.requires_grad
        torch.testing.assert_close(values, tv, atol=1e-6, rtol=1e-6)
        assert torch.equal(indices, ti)


def test_linear_loss_head_ldam_margin_can_be_scheduled():
    """Setting ``max_margin`` rebuilds the margins (as LDAMLoss's does), keeping the module's dtype; a float64
    head gets them exact in float64."""
    counts = [500, 100, 20, 5]
    head = fastlt.LinearLossHead(3, 4, counts, loss="ldam", backend="torch")
    f = torch.randn(6, 3, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 3, 2])
    before = head(f, y)
    head.max_margin = 0.0
    torch.testing.assert_close(head.margins, torch.zeros(4), rtol=0, atol=0)
    plain = F.cross_entropy(30.0 * F.linear(f, head.weight, head.bias), y)
    torch.testing.assert_close(head(f, y), plain)
    assert (head(f, y) - before).abs() > 1e-3
    head.double()
    head.max_margin = 0.3
    torch.testing.assert_close(head.margins, ldam_margins(counts, 0.3, dtype=torch.float64), rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_margin"):
        head.max_margin = -1.0


def test_linear_loss_head_initialises_as_nn_linear():
    counts = [50, 20, 10, 5, 1]
    for bias in (True, False):
        torch.manual_seed(7)
        head = fastlt.LinearLossHead(9, 5, counts, bias=bias)
        torch.manual_seed(7)
        lin = torch.nn.Linear(9, 5, bias=bias)
        assert torch.equal(head.weight, lin.weight)
        if bias:
            assert torch.equal(head.bias, lin.bias)
        lin.load_state_dict(head.state_dict())  # same parameter names
        weighted = fastlt.LinearLossHead(9, 5, counts, bias=bias, weight_classes=torch.rand(5) + 0.5)
        weighted.load_state_dict(lin.state_dict())  # class weights are configuration, not state
        assert set(weighted.state_dict()) == set(lin.state_dict())
        assert weighted.weight_classes is not None
    head = fastlt.LinearLossHead(9, 5, counts, loss="ldam", dtype=torch.float16)
    assert head.weight.dtype == torch.float16 and head.bias.dtype == torch.float16


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cosine_gcl_head_triton_matches_torch(reduction):
    gen = torch.Generator().manual_seed(19)
    N, D, C = 10, 8, 21
    counts = long_tail_counts(C, gen)
    common = dict(m=0.1, s=20.0, noise_mul=0.5, gamma=1.0, reduction=reduction, chunk_rows=3)
    head = fastlt.CosineGCLHead(D, C, counts, backend="triton", **common).to(DEVICE)
    ref = fastlt.CosineGCLHead(D, C, counts, backend="torch", **common)
    ref.load_state_dict(head.state_dict())
    ref.to(DEVICE)
    f = torch.randn(N, D, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    fk, fr = f.to(DEVICE, copy=True).requires_grad_(), f.to(DEVICE, copy=True).requires_grad_()
    lk = head(fk, y.to(DEVICE), seed=4242)
    lr = ref(fr, y.to(DEVICE), seed=4242)
    go = torch.linspace(0.5, 2.0, N, device=DEVICE) if reduction == "none" else torch.tensor(1.5, device=DEVICE)
    lk.backward(go)
    lr.backward(go)
    # the torch path draws the same Philox noise from the seed, to float32 rounding (times s)
    torch.testing.assert_close(lk, lr, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(fk.grad, fr.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.weight.grad, ref.weight.grad, atol=1e-4, rtol=1e-4)
    # against the oracle with the kernel's noise and the GCL formula
    cv = dict(cloud=gcl_cloud(counts, dtype=torch.float64), noise_mul=0.5, seed=4242, margin=0.1, scale=20.0,
              gamma=1.0)
    want = H.reference_cosine_cross_entropy(f.double(), head.weight.detach().double().cpu(), y,
                                            reduction=reduction, **cv)
    torch.testing.assert_close(lk.detach().double().cpu(), want, atol=2e-5, rtol=1e-5)
    other = head(f.to(DEVICE), y.to(DEVICE), seed=1)
    assert not torch.allclose(other, lk.detach(), atol=1e-3)


def test_cosine_gcl_head_folds_noise_mul_into_the_cloud_for_the_kernels():
    """On the kernels, CosineGCLHead with noise_mul 0.5 hands them its fp32 noise_mul * cloud and noise_mul 1
    (fastlt._operator.FoldedSpread): bit for bit the functional call that multiplies in the kernel."""
    gen = torch.Generator().manual_seed(23)
    N, D, C = 6, 8, 21
    head = fastlt.CosineGCLHead(D, C, long_tail_counts(C, gen), m=0.1, s=20.0, noise_mul=0.5, gamma=1.0,
                                backend="triton", chunk_rows=4).to(DEVICE)
    f = torch.randn(N, D, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    got = head(f, y, seed=7)
    want = H.cosine_cross_entropy(f, head.weight, y, cloud=head.cloud, noise_mul=0.5, margin=0.1, scale=20.0,
                                  gamma=1.0, seed=7, backend="triton", chunk_rows=4)
    assert torch.equal(got, want)
    spread, one = head._fold(head.cloud, 0.5)
    assert one == 1.0 and torch.equal(spread, head.cloud.float() * 0.5)


def test_cosine_gcl_head_without_noise_and_margin_is_scaled_cosine_softmax():
    gen = torch.Generator().manual_seed(20)
    N, D, C = 8, 5, 9
    head = fastlt.CosineGCLHead(D, C, long_tail_counts(C, gen), m=0.0, s=16.0, noise_mul=0.0,
                                backend="triton").to(DEVICE)
    f = torch.randn(N, D, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    got = head(f.to(DEVICE), y.to(DEVICE))
    cos = F.normalize(f.double(), dim=1) @ F.normalize(head.weight.detach().double().cpu(), dim=1).t()
    torch.testing.assert_close(got.double().cpu(), F.cross_entropy(16.0 * cos, y), atol=1e-5, rtol=1e-5)


def test_cosine_gcl_head_state_dict_and_logits_match_cosine_classifier():
    gen = torch.Generator().manual_seed(21)
    N, D, C = 7, 6, 12
    counts = long_tail_counts(C, gen)
    torch.manual_seed(3)
    head = fastlt.CosineGCLHead(D, C, counts)
    torch.manual_seed(3)
    cc = fastlt.CosineClassifier(D, C)
    assert torch.equal(head.weight, cc.weight)  # the same initialisation
    assert set(head.state_dict()) == set(cc.state_dict()) == {"weight"}
    cc2 = fastlt.CosineClassifier(D, C)
    cc2.load_state_dict(head.state_dict())
    head2 = fastlt.CosineGCLHead(D, C, counts, weight_classes=torch.rand(C) + 0.5)  # class weights: not state
    head2.load_state_dict(cc2.state_dict())
    assert set(head2.state_dict()) == {"weight"}
    head, cc2 = head.to(DEVICE), cc2.to(DEVICE)
    assert torch.equal(head2.weight, head.weight.cpu())
    f = torch.randn(N, D, generator=gen).to(DEVICE)
    z = head.logits(f)
    torch.testing.assert_close(z, cc2(f), atol=1e-6, rtol=1e-6)
    assert z.abs().max() <= 1.0 + 1e-6
    for k, rows in [(1, 2), (4, 3), (C, None)]:
        values, indices = head.topk(f, k, chunk_rows=rows)
        tv, ti = torch.topk(z, k, dim=1)
        torch.testing.assert_close(values, tv, atol=1e-6, rtol=1e-6)
        assert torch.equal(indices, ti)


def test_module_defaults_and_repr():
    counts = [100, 10, 1]
    h = fastlt.LinearLossHead(4, 3, counts)
    assert h.loss == "la" and h.tau == 1.0 and h.s == 1.0 and h.backend == "auto"
    assert fastlt.LinearLossHead(4, 3, counts, loss="ldam", s=10.0).s == 10.0
    g = fastlt.CosineGCLHead(4, 3, counts)
    assert (g.m, g.s, g.noise_mul, g.gamma) == (0.5, 30.0, 1.0, 0.0)
    torch.testing.assert_close(g.cloud, gcl_cloud(counts))
    torch.testing.assert_close(h.log_prior, log_prior(counts))
    assert "loss='la'" in repr(h) and "in_features=4" in repr(h) and "m=0.5" in repr(g)
    assert "chunk_rows" not in repr(h) and "eps" not in repr(g) and "max_margin" not in repr(h)
    # each loss's own hyperparameters and the options set (they were left out)
    assert "max_margin=0.25" in repr(fastlt.LinearLossHead(4, 3, counts, loss="ldam", max_margin=0.25))
    assert "alpha=0.2, remine_lambda=0.1" in repr(fastlt.LinearLossHead(4, 3, counts, loss="lade", alpha=0.2))
    assert "chunk_rows=2" in repr(fastlt.LinearLossHead(4, 3, counts, chunk_rows=2))
    assert "chunk_classes=16" in repr(fastlt.CosineGCLHead(4, 3, counts, chunk_classes=16))
    assert "eps=1e-06" in repr(fastlt.CosineGCLHead(4, 3, counts, eps=1e-6))


def test_functional_exports_are_the_heads_functions():
    assert LF.linear_cross_entropy is H.linear_cross_entropy
    assert LF.cosine_cross_entropy is H.cosine_cross_entropy
    assert {"linear_cross_entropy", "cosine_cross_entropy"} <= set(LF.__all__)
    assert fastlt.LinearLossHead is H.LinearLossHead and fastlt.CosineGCLHead is H.CosineGCLHead
    assert {"LinearLossHead", "CosineGCLHead"} <= set(fastlt.__all__)


def test_backend_torch_and_auto_run_the_reference():
    gen = torch.Generator().manual_seed(22)
    f, w, b, y = _inputs(5, 4, 6, gen)
    want = H.reference_linear_cross_entropy(f, w, y, b)
    assert torch.equal(LF.linear_cross_entropy(f, w, y, b, backend="torch"), want)  # float64 is fine here
    assert torch.equal(LF.linear_cross_entropy(f, w, y, b, backend="auto"), want)  # CPU tensors
    noise = torch.rand(5, 6, generator=gen, dtype=torch.float64)
    cloud = gcl_cloud([5, 4, 3, 2, 1, 1], dtype=torch.float64)
    got = LF.cosine_cross_entropy(f, w, y, cloud=cloud, noise_mul=1.0, noise=noise, backend="torch")
    torch.testing.assert_close(got, R.adjusted_cross_entropy(F.normalize(f, dim=1) @ F.normalize(w, dim=1).t(), y,
                                                             cloud=cloud, noise_mul=1.0, noise=noise))


# --- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shape_and_dtype_errors(backend):
    f = torch.randn(4, 3, device=DEVICE)
    w = torch.randn(5, 3, device=DEVICE)
    b = torch.randn(5, device=DEVICE)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    lce = lambda *a, **k: LF.linear_cross_entropy(*a, backend=backend, **k)
    with pytest.raises(ValueError, match="features"):
        lce(f[0], w, y)
    with pytest.raises(ValueError, match="features"):
        LF.cosine_cross_entropy(f[None], w, y, backend=backend)
    with pytest.raises(TypeError, match="features"):
        lce(f.tolist(), w, y)
    with pytest.raises(ValueError, match="features \\(N, D\\) and weight \\(C, D\\) must agree on D"):
        lce(f, torch.randn(5, 4, device=DEVICE), y)
    with pytest.raises(ValueError, match="features \\(N, D\\) and weight \\(C, D\\) must agree on D"):
        LF.cosine_cross_entropy(f, torch.randn(5, 4, device=DEVICE), y, backend=backend)
    with pytest.raises(ValueError, match="at least one class"):
        lce(f, w[:0], y)
    with pytest.raises(TypeError, match="weight has dtype"):
        lce(f, w.half(), y)
    with pytest.raises(TypeError, match="features"):
        lce(f.int(), w, y)
    with pytest.raises(ValueError, match="bias must have shape"):
        lce(f, w, y, b[:4])
    with pytest.raises(ValueError, match="bias must have shape"):
        lce(f, w, y, b[None])
    with pytest.raises(TypeError, match="bias has dtype"):
        lce(f, w, y, b.half())
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="chunk_rows"):
            lce(f, w, y, b, chunk_rows=bad)
        with pytest.raises(ValueError, match="chunk_rows"):
            LF.cosine_cross_entropy(f, w, y, backend=backend, chunk_rows=bad)
    with pytest.raises(ValueError, match="eps"):
        LF.cosine_cross_entropy(f, w, y, backend=backend, eps=0.0)
    with pytest.raises(ValueError, match="target"):
        lce(f, w, y[:3])
    with pytest.raises(ValueError, match="backend"):
        LF.linear_cross_entropy(f, w, y, backend="cuda")


def test_triton_only_errors():
    f = torch.randn(4, 3, device=DEVICE)
    w = torch.randn(5, 3, device=DEVICE)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        LF.linear_cross_entropy(f.double(), w.double(), y, backend="triton")
    with pytest.raises(TypeError, match="float64"):
        LF.cosine_cross_entropy(f.double(), w.double(), y, backend="triton")
    cloud = gcl_cloud([5, 4, 3, 2, 1]).to(DEVICE)
    with pytest.raises(ValueError, match="noise"):
        LF.cosine_cross_entropy(f, w, y, cloud=cloud, noise_mul=1.0, noise=torch.rand(4, 5, device=DEVICE),
                                backend="triton")
    # the operator's own checks run on the (N, C) shape without materialising it
    with pytest.raises(ValueError, match="prior"):
        LF.linear_cross_entropy(f, w, y, log_prior=torch.zeros(4, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="reduction"):
        LF.linear_cross_entropy(f, w, y, reduction="avg", backend="triton")


def test_target_out_of_range():
    f = torch.randn(3, 4, device=DEVICE)
    w = torch.randn(5, 4, device=DEVICE)
    y = torch.tensor([0, 5, 1], device=DEVICE)
    if DEVICE == "cpu":  # the range is checked on CPU tensors only (no GPU sync)
        for fn in (LF.linear_cross_entropy, LF.cosine_cross_entropy):
            for backend in ("triton", "torch"):
                with pytest.raises(ValueError, match="target holds class 5"):
                    fn(f, w, y, backend=backend)
        with pytest.raises(ValueError, match="target holds class -3"):
            LF.linear_cross_entropy(f, w, torch.tensor([0, -3, 1]), backend="triton")
    else:  # on the GPU the kernels give NaN for such a row
        assert torch.isnan(LF.linear_cross_entropy(f, w, y, backend="triton", reduction="none")[1])


def test_module_errors():
    counts = [10, 5, 1]
    with pytest.raises(ValueError, match="class_counts"):
        fastlt.LinearLossHead(4, 3, loss="la")
    with pytest.raises(ValueError, match="class_counts"):
        fastlt.LinearLossHead(4, 3, loss="ldam")
    with pytest.raises(ValueError, match="class_counts"):
        fastlt.LinearLossHead(4, 4, counts)
    with pytest.raises(ValueError, match="class_counts"):
        fastlt.CosineGCLHead(4, 4, counts)
    with pytest.raises(ValueError, match="loss"):
        fastlt.LinearLossHead(4, 3, counts, loss="focal")
    with pytest.raises(ValueError, match="in_features"):
        fastlt.LinearLossHead(0, 3, counts)
    with pytest.raises(ValueError, match="num_classes"):
        fastlt.CosineGCLHead(4, True, counts)
    with pytest.raises(ValueError, match="chunk_rows"):
        fastlt.CosineGCLHead(4, 3, counts, chunk_rows=0)
    with pytest.raises(ValueError, match="backend"):
        fastlt.LinearLossHead(4, 3, counts, backend="cuda")
    with pytest.raises(ValueError, match="reduction"):
        fastlt.CosineGCLHead(4, 3, counts, reduction="avg")
    with pytest.raises(ValueError, match="eps"):
        fastlt.CosineGCLHead(4, 3, counts, eps=0.0)
    with pytest.raises(ValueError, match="fixes tau = 1"):  # was ignored
        fastlt.LinearLossHead(4, 3, counts, loss="balanced_softmax", tau=0.5)
    head = fastlt.LinearLossHead(4, 3, counts, loss="balanced_softmax")
    with pytest.raises(AttributeError, match="loss is fixed"):  # was taken: 'ldam' then ran as plain CE (no margins)
        head.loss = "ldam"
    assert head.loss == "balanced_softmax"
    for head in (fastlt.LinearLossHead(4, 3, counts).to(DEVICE), fastlt.CosineGCLHead(4, 3, counts).to(DEVICE)):
        y = torch.tensor([0, 1], device=DEVICE)
        with pytest.raises(ValueError, match=r"features must have shape \(N, 4\)"):
            head(torch.randn(2, 5, device=DEVICE), y)
        with pytest.raises(ValueError, match="features must have shape"):
            head.logits(torch.randn(4, device=DEVICE))
        f = torch.randn(2, 4, device=DEVICE)
        for k in (0, 4, True, 1.0):
            with pytest.raises(ValueError, match="k must"):
                head.topk(f, k)
        with pytest.raises(ValueError, match="chunk_rows"):
            head.topk(f, 1, chunk_rows=0)


# --- chunk size ---------------------------------------------------------------------------------------------------

def test_default_chunk_rows():
    budget = H.CHUNK_BYTES
    assert budget == 512 << 20
    assert H.default_chunk_rows(1000, torch.float32) == 134208  # 536870912 / 4000 = 134217.7 -> multiple of 64
    assert H.default_chunk_rows(1000, torch.bfloat16) == 268416
    assert H.default_chunk_rows(131072, torch.bfloat16) == 2048  # 4096 rows of 131072 classes: two chunks
    assert H.default_chunk_rows(10**9, torch.float32) == 1  # never below one row
    assert H.default_chunk_rows(0, torch.float32) == budget // 4
    assert H.default_chunk_rows(10, torch.float16, chunk_bytes=1000) == 50  # below 64 rows: as is
    assert H.default_chunk_rows(10, torch.float16, chunk_bytes=20 * 130) == 128
    for C in (1, 7, 1000, 8142, 32000, 10**6, 3 * 10**7):
        for dtype in DTYPES:
            rows = H.default_chunk_rows(C, dtype)
            item = torch.empty((), dtype=dtype).element_size()
            assert rows >= 1 and isinstance(rows, int)
            assert rows * C * item <= budget or rows == 1
            if rows >= 64:
                assert rows % 64 == 0
                assert (rows + 64) * C * item > budget  # the largest such multiple
            else:
                assert (rows + 1) * C * item > budget


@pytest.mark.parametrize("chunk_rows,chunk_classes", [(None, None), (3, None), (None, 16)],
                         ids=["one_chunk", "row_chunks", "class_chunks"])
def test_seed_tensor_gives_the_int_seeds_noise_in_the_cosine_head(chunk_rows, chunk_classes):
    """The cosine GCL head with a one-element int64 seed tensor (read on the device) equals the same int seed:
    loss and both gradients, over one chunk, row chunks and class chunks."""
    gen = torch.Generator().manual_seed(41)
    N, D, C = 7, 5, 40
    f, w = torch.randn(N, D, generator=gen), torch.randn(C, D, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    cloud = gcl_cloud(torch.randint(1, 300, (C,), generator=gen))
    seed = 2**50 + 3
    outs = []
    for s in (seed, torch.tensor([seed], device=DEVICE)):
        fk, wk = f.to(DEVICE).requires_grad_(), w.to(DEVICE).requires_grad_()
        loss = LF.cosine_cross_entropy(fk, wk, y.to(DEVICE), cloud=cloud.to(DEVICE), noise_mul=1.0, margin=0.5,
                                       scale=30.0, seed=s, backend="triton", chunk_rows=chunk_rows,
                                       chunk_classes=chunk_classes)
        loss.backward()
        outs.append((loss.detach(), fk.grad, wk.grad))
    for a, b in zip(outs[0], outs[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["la", "lade", "gcl"])
def test_half_features_from_an_autocast_backbone_on_both_backends(kind):
    """Under autocast a backbone hands bf16 features to an fp32 head: the kernels' path cast the head into the
    autocast dtype (as nn.Linear runs), the reference path refused the dtypes ('run under torch.autocast', which
    it was). Both run now and agree."""
    counts = long_tail_counts(7, torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(8)
    f32 = torch.randn(6, 5, generator=gen).to(DEVICE)
    y = torch.randint(0, 7, (6,), generator=gen).to(DEVICE)
    out = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        head = (fastlt.CosineGCLHead(5, 7, counts, s=8.0, backend=backend) if kind == "gcl"
                else fastlt.LinearLossHead(5, 7, counts, loss=kind, backend=backend)).to(DEVICE)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            f = f32.to(torch.bfloat16)
            loss = head(f, y, seed=3) if kind == "gcl" else head(f, y)
        assert loss.dtype == torch.float32
        out[backend] = float(loss)
    assert out["torch"] == pytest.approx(out["triton"], rel=3e-2, abs=3e-2)


def test_eps_assigned_later_is_checked_and_topk_values_take_the_logits_dtype():
    """A cosine head's eps assigned after construction was checked on the reference path only (0 gave the kernels
    NaN for an all-zero feature row); topk's values took the features' dtype, not the logits' (fp32 values of
    bf16 logits under autocast)."""
    import fastlt

    head = fastlt.CosineGCLHead(4, 6, [50, 20, 9, 4, 2, 1], backend="triton")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be"):
            head.eps = bad
    head.eps = 1e-6
    assert head.eps == 1e-6
    lin = fastlt.LinearLossHead(4, 6, [50, 20, 9, 4, 2, 1], loss="la")
    x = torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = lin.topk(x, 2)
        want = lin.logits(x)
    assert values.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(values, want.topk(2, dim=1).values)
    with pytest.raises(ValueError, match=r"features \(N, D\) and weight \(C, D\) must agree on D"):
        fastlt.functional.linear_cross_entropy(torch.randn(5, 5), torch.randn(10, 4), torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("make", [lambda: fastlt.LinearLossHead(4, 3, [100, 10, 1]),
                                  lambda: fastlt.CosineGCLHead(4, 3, [100, 10, 1])], ids=["linear", "cosine"])
def test_inference_refuses_features_of_another_dtype_outside_autocast(make):
    """logits/topk on features of another dtype than the weight: the linear head raised F.linear's bare
    RuntimeError and the cosine head cast the weight silently; both refuse it as the loss does (and
    CosineClassifier), and autocast still runs them."""
    head = make()
    f = torch.randn(5, 4, dtype=torch.bfloat16)
    for call in (head.logits, head.topk):
        with pytest.raises(TypeError, match="features are torch.bfloat16 but weight is torch.float32"):
            call(f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = head.logits(f)
        values, _ = head.topk(f, 2)
    expected = head.logits(f.float())
    torch.testing.assert_close(z.float(), expected, atol=0.05, rtol=0.05)
    torch.testing.assert_close(values.float(), expected.topk(2).values, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("fn", ["linear", "cosine", "lade"])
def test_bad_class_weights_are_named_weight_classes(fn, backend):
    """A head's (C, D) matrix is ``weight``; its class weights are ``weight_classes``, and a bad one was reported as
    ``weight`` (the loss's name for them), blaming an argument that is fine."""
    from fastlt.heads.functional import cosine_cross_entropy, linear_cross_entropy
    from fastlt.lade_head import lade_linear_loss

    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(5, 8, generator=g).to(DEVICE), torch.randn(11, 8, generator=g).to(DEVICE)
    y = torch.randint(0, 11, (5,), generator=g).to(DEVICE)
    call = {"linear": lambda wc: linear_cross_entropy(x, w, y, weight_classes=wc, backend=backend),
            "cosine": lambda wc: cosine_cross_entropy(x, w, y, weight_classes=wc, backend=backend),
            "lade": lambda wc: lade_linear_loss(x, w, y, torch.full((11,), 1 / 11, device=DEVICE),
                                                weight_classes=wc, backend=backend)}[fn]
    with pytest.raises(ValueError, match=r"^weight_classes must have shape \(C,\) = \(11,\), got \(13,\)"):
        call(torch.rand(13, device=DEVICE))
    with pytest.raises(TypeError, match=r"^weight_classes must be a floating tensor"):
        call(torch.ones(11, dtype=torch.int64, device=DEVICE))
    if fn == "cosine":  # a head module's class weights replaced after it was made
        head = fastlt.CosineGCLHead(8, 11, torch.randint(1, 99, (11,), generator=g), backend=backend).to(DEVICE)
        head.weight_classes = torch.rand(13, device=DEVICE)
        with pytest.raises(ValueError, match=r"^weight_classes must have shape"):
            head(x, y)
