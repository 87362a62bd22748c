"""The fused autograd Functions are first-order (``fastlt._first_order.first_order``): a gradient taken with
``create_graph=True`` cannot be differentiated again, and a clear error says so instead of a silent zero or
"does not require grad". A gradient computed in the forward is scaled in place by its first backward, so a second
backward through the same graph raises rather than scaling it again."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

from fastlt import functional as LF
from fastlt.lade_head import lade_linear_loss


def _losses():
    gen = torch.Generator().manual_seed(3)
    N, C, D = 5, 7, 4
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    pi = (torch.rand(C, generator=gen) + 0.1).to(DEVICE)
    pi = pi / pi.sum()
    prior = pi.log()
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    x = torch.randn(N, D, generator=gen).to(DEVICE)
    w = torch.randn(C, D, generator=gen).to(DEVICE)
    return {
        "adjusted ce": ((z,), lambda z: LF.adjusted_cross_entropy(z, y, log_prior=prior, backend="triton")),
        "lade": ((z,), lambda z: LF.lade_loss(z, y, pi, 0.1, 0.1, backend="triton")),
        "linear head": ((x, w), lambda x, w: LF.linear_cross_entropy(x, w, y, log_prior=prior, backend="triton")),
        "cosine head": ((x, w), lambda x, w: LF.cosine_cross_entropy(x, w, y, scale=8.0, backend="triton")),
        "lade head": ((x, w), lambda x, w: lade_linear_loss(x, w, y, pi, backend="triton")),
    }


@pytest.mark.parametrize("name", list(_losses()))
def test_second_order_gradient_raises_clearly(name):
    inputs, fn = _losses()[name]
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, create_graph=True)
    # the first-order gradient itself is still returned
    assert all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.square().sum() for g in grads).backward()


def test_grad_in_forward_second_backward_raises_and_keeps_the_first():
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(4, 9, generator=gen).to(DEVICE)
    y = torch.randint(0, 9, (4,), generator=gen).to(DEVICE)
    leaf = z.requires_grad_()
    loss = LF.adjusted_cross_entropy(leaf * 1.0, y, backend="triton", grad_in_forward=True)
    (2.5 * loss).backward(retain_graph=True)
    first = leaf.grad.clone()
    expected = (torch.softmax(z.detach().double(), 1) - torch.nn.functional.one_hot(y, 9)) * 2.5 / 4
    torch.testing.assert_close(first.double(), expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        (2.5 * loss).backward()
    assert torch.equal(leaf.grad, first)


def test_recompute_backward_can_run_twice():
    gen = torch.Generator().manual_seed(5)
    leaf = torch.randn(4, 9, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 9, (4,), generator=gen).to(DEVICE)
    loss = LF.adjusted_cross_entropy(leaf, y, backend="triton")
    (2.5 * loss).backward(retain_graph=True)
    first = leaf.grad.clone()
    (2.5 * loss).backward()
    torch.testing.assert_close(leaf.grad, 2 * first)


@pytest.mark.parametrize("op", [torch.relu, torch.sigmoid, torch.exp])
def test_grad_in_forward_over_a_saved_output_raises(op):
    """The gradient in the forward overwrites the logits. An op whose backward reads its own output (relu, sigmoid,
    exp) would silently read that gradient instead: the write bumps the logits' version, so autograd raises its
    in-place error. An op that saves only its inputs (a linear layer) is unaffected."""
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 9, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 9, (6,), generator=gen).to(DEVICE)
    loss = LF.adjusted_cross_entropy(op(h), y, backend="triton", grad_in_forward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x = torch.randn(6, 4, generator=gen).to(DEVICE)
    lin = torch.nn.Linear(4, 9).to(DEVICE)
    LF.adjusted_cross_entropy(lin(x), y, backend="triton", grad_in_forward=True).backward()
    fused = lin.weight.grad.clone()
    lin.weight.grad = None
    LF.adjusted_cross_entropy(lin(x), y, backend="triton").backward()
    torch.testing.assert_close(fused, lin.weight.grad, rtol=1e-5, atol=1e-6)
