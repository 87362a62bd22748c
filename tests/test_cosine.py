"""fastlt.CosineClassifier: cosine logits in [-1, 1], their gradient, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from test_losses import close, gen

import fastlt


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


def test_half_precision_norms_do_not_overflow():
    """A float16 feature (or weight) row whose norm is above 65504, every entry finite: the norm was taken in
    float16 (inf), and every cosine of that row came out 0. Taken in float32 now, as the fused heads do."""
    head = fastlt.CosineClassifier(64, 3)
    x = torch.full((2, 64), 10000.0)
    x[1] = torch.randn(64, generator=gen(3))
    want = fastlt.CosineClassifier(64, 3).double()
    want.load_state_dict(head.state_dict())
    expected = want(x.double())
    close(head.half()(x.half()).double(), expected, 2e-3)
    with torch.no_grad():
        head.weight[0] = 10000.0
        want.weight[0] = 10000.0
    close(head(x.half()).double(), want(x.double()), 2e-3)


def test_features_of_another_dtype_or_device_are_refused_by_name():
    head = fastlt.CosineClassifier(4, 3)
    with pytest.raises(TypeError, match="features are torch.float64 but weight is torch.float32"):
        head(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="features are on meta but weight is on cpu"):
        head(torch.randn(2, 4, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an autocast backbone's output: the product's dtype
        assert head(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cosine_head_is_scale_invariant_past_float32_squares(backend):
    """fp32 features and weight rows of norm ~1e25 (their squares overflow fp32) or ~1e-25 with a small eps
    (their squares underflow) give the loss and the direction of the gradients of the same rows at norm ~1:
    the norms are taken relative to each row's largest element, on both backends."""
    from conftest import DEVICE

    from fastlt.heads import cosine_cross_entropy
    f = torch.randn(6, 12, generator=gen(31))
    w = torch.randn(5, 12, generator=gen(32))
    y = torch.randint(0, 5, (6,), generator=gen(33))

    def loss_and_grads(fs, ws):
        leaves = [t.to(DEVICE, copy=True).requires_grad_() for t in (fs, ws)]
        loss = cosine_cross_entropy(*leaves, y.to(DEVICE), scale=16.0, eps=1e-35, backend=backend)
        loss.backward()
        return loss.detach().cpu(), [t.grad.cpu() for t in leaves]

    loss, (gf, gw) = loss_and_grads(f, w)
    for scale in (1e25, 1e-25):
        f2, w2 = f.clone(), w.clone()
        f2[::2] *= scale
        w2[1::2] *= scale
        loss2, (gf2, gw2) = loss_and_grads(f2, w2)
        close(loss2, loss, 1e-5)
        rows_f, rows_w = torch.ones(6, 1), torch.ones(5, 1)
        rows_f[::2], rows_w[1::2] = scale, scale
        close(gf2 * rows_f, gf, 1e-4)  # d/dx of a scale-invariant function scales as 1 / scale
        close(gw2 * rows_w, gw, 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_norms_save_no_more_than_f_normalize(dtype):
    """The reference's wide norm (float64 sums, for fp32 rows past 1.8e19) keeps autograd's saved tensors to what
    F.normalize saves (the input and the (R, 1) norms): a (R, D) copy more would cost a 10^6-class
    CosineClassifier 2 GB."""
    from fastlt.reference import normalize_rows

    def saved_bytes(fn, x):
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() != x.untyped_storage().data_ptr():
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x)
        return sum(storages.values())

    x = torch.randn(300, 64, generator=gen(41)).to(dtype).requires_grad_()
    ours = saved_bytes(lambda t: normalize_rows(t, 1e-12), x)
    theirs = saved_bytes(lambda t: torch.nn.functional.normalize(t.float(), dim=1).to(dtype), x)
    assert ours <= theirs + 300 * 8, (ours, theirs)  # (+ the float64 norms)
