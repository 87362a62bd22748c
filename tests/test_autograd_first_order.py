"""The fused autograd Functions are first-order (``fastlt._first_order.first_order``): a gradient taken with
``create_graph=True`` cannot be differentiated again, and a clear error says so instead of a silent zero or
"does not require grad". A gradient computed in the forward is scaled in place by its first backward, so a second
backward through the same graph raises rather than scaling it again."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE, IdentityView

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


@pytest.mark.parametrize("name", [*_losses(), "grad in forward"])
def test_second_order_toward_the_inputs_raises_too(name):
    """A second differentiation asked toward given tensors (``backward(inputs=...)``, ``autograd.grad`` with
    ``allow_unused``, ``torch.autograd.functional.hessian``) runs only the nodes leading to them: the error node, which
    led to fresh leaves only, was skipped and the second-order term came back 0 or None."""
    if name == "grad in forward":
        gen = torch.Generator().manual_seed(6)
        inputs = (torch.randn(4, 9, generator=gen).to(DEVICE),)
        y = torch.randint(0, 9, (4,), generator=gen).to(DEVICE)

        def fn(z):
            return LF.adjusted_cross_entropy(z * 1.0, y, backend="triton", grad_in_forward=True)
    else:
        inputs, fn = _losses()[name]
    leaves = [t.clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        sum(g.square().sum() for g in grads).backward(inputs=leaves[-1:])
    grads = torch.autograd.grad(fn(*leaves), leaves, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(grads[0].square().sum(), leaves[0], allow_unused=True)
    if len(inputs) == 1:
        with pytest.raises(RuntimeError, match="differentiate twice"):
            torch.autograd.functional.hessian(fn, inputs[0])


def test_what_the_guard_keeps_is_freed_with_the_backward():
    """The guard's anchors (what its error node leads to) kept the logits written with the gradient alive after the
    backward, and a head's features from its forward on, for as long as the loss lived."""
    import gc
    import weakref

    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 6, generator=gen).to(DEVICE)
    lin = torch.nn.Linear(6, 9).to(DEVICE)
    y = torch.randint(0, 9, (4,), generator=gen).to(DEVICE)
    z = lin(x)
    alive = weakref.ref(z)
    loss = LF.adjusted_cross_entropy(z, y, backend="triton", grad_in_forward=True)
    del z
    loss.backward()
    gc.collect()
    assert alive() is None
    w = torch.randn(9, 9, generator=gen).to(DEVICE).requires_grad_()
    f = lin(x)
    alive = weakref.ref(f)
    loss = LF.linear_cross_entropy(f, w, y, backend="triton")
    del f
    gc.collect()
    assert alive() is None


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


_SAVED_OUTPUT_VIEWS = {  # a view of an output its op's backward reads: the gradient written over it must raise
    "relu, view": lambda out: torch.relu(out).view(-1, 9),
    "exp, reshape": lambda out: torch.exp(out).reshape(-1, 9),
    "tanh, flatten": lambda out: torch.tanh(out).flatten(0, 1),
    "sigmoid, slice": lambda out: torch.sigmoid(out.view(-1, 9))[:, :],
}
_PLAIN_VIEWS = {  # views of a linear layer's output (nothing saved it): the fused gradient must equal the recompute one
    "view": lambda out: out.view(-1, 9),
    "split": lambda out: out.view(-1, 9).split(4, dim=0)[0],
    "chunk": lambda out: torch.cat([out, out], -1).view(-1, 18).chunk(2, dim=1)[1],
    "unbind": lambda out: out.unbind(1)[0],
    "custom Function's view": lambda out: IdentityView.apply(out.view(-1, 9))[:, :],
}


@pytest.mark.parametrize("name", list(_SAVED_OUTPUT_VIEWS))
def test_grad_in_forward_over_a_view_of_a_saved_output_raises(name):
    """As above when the logits are a view of that output (the usual ``logits.view(-1, C)`` of a (B, T, C) output):
    the view shares its base's version counter, so the write reaches relu's saved output too (before, only logits
    that were not views were marked, and these gave a wrong gradient silently)."""
    gen = torch.Generator().manual_seed(6)
    h = torch.randn(2, 3, 9, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 9, (6,), generator=gen).to(DEVICE)
    loss = LF.adjusted_cross_entropy(_SAVED_OUTPUT_VIEWS[name](h), y, backend="triton", grad_in_forward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("name", list(_PLAIN_VIEWS))
def test_grad_in_forward_over_views_of_a_linear_output(name):
    """Views of multi-output ops (split, chunk, unbind) and of a custom Function's output take the gradient in the
    forward as any other logits: autograd refuses to rebuild their history after an in-place write, so the
    Function must not save them (it keeps a detached alias)."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 4, generator=gen).to(DEVICE)
    lin = torch.nn.Linear(4, 9).to(DEVICE)
    rows = _PLAIN_VIEWS[name](lin(x)).shape[0]
    y = torch.randint(0, 9, (rows,), generator=gen).to(DEVICE)
    grads = []
    for grad_in_forward in (True, False):
        lin.zero_grad()
        logits = _PLAIN_VIEWS[name](lin(x))
        (3.0 * LF.adjusted_cross_entropy(logits, y, backend="triton", grad_in_forward=grad_in_forward)).backward()
        grads.append((lin.weight.grad.clone(), lin.bias.grad.clone()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[1][0].abs().sum() > 0


def test_torch_func_transforms_take_the_reference_path():
    """torch.func.grad / vmap: the kernels' autograd Functions are not functorch rules (torch's "must override the
    setup_context" error named neither fastlt nor the way out), so backend='triton' refuses them by name and 'auto'
    takes the reference, which runs under them: per-sample gradients equal F.cross_entropy's. GCL's drawn seed
    cannot be drawn inside a transform: it asks for seed=."""
    import fastlt
    from fastlt import priors

    counts = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(2)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 4, 1])
    lp = priors.log_prior(counts, dtype=torch.float64)
    want = torch.stack([torch.autograd.functional.jacobian(
        lambda a, t=t: torch.nn.functional.cross_entropy((a + lp)[None], t[None]), zz)
        for zz, t in zip(z, y, strict=True)])
    for backend in ("auto", "torch"):
        crit = fastlt.LogitAdjustedLoss(counts, backend=backend).double()
        per_sample = torch.func.vmap(torch.func.grad(lambda a, t, crit=crit: crit(a[None], t[None])))(z, y)
        torch.testing.assert_close(per_sample, want)
    crit = fastlt.LogitAdjustedLoss(counts, backend="triton").to(DEVICE)
    with pytest.raises(RuntimeError, match=r"torch.func transforms .*backend='torch'"):
        torch.func.grad(lambda a: crit(a, y.to(DEVICE)))(z.float().to(DEVICE))
    gcl = fastlt.GCLLoss(counts, backend="torch").double()
    with pytest.raises(ValueError, match="pass seed="):
        torch.func.grad(lambda a: gcl(a, y))(z)
    a = z.clone().requires_grad_()
    gcl(a, y, seed=5).backward()
    torch.testing.assert_close(torch.func.grad(lambda a: gcl(a, y, seed=5))(z), a.grad)


def test_transforms_over_other_tensors_and_forward_mode_are_refused_by_the_kernels():
    """The kernels take the class tensors as constants and their Functions are not functorch rules. A transform over
    the targets or a class tensor alone (plain logits), or a forward-mode tangent on a class tensor, reached them:
    torch's "must override the setup_context" error, or worse, a class tensor's tangent dropped without an error
    (forward-mode AD through log_prior gave None). backend='triton' now refuses any active transform or dual level
    by name; backend='torch' gives the tangent."""
    import torch.autograd.forward_ad as fwAD

    import fastlt

    counts = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, generator=g).to(DEVICE)
    y = torch.tensor([0, 1, 4, 1]).to(DEVICE)
    crit = fastlt.LogitAdjustedLoss(counts, backend="triton").to(DEVICE)
    with pytest.raises(RuntimeError, match="torch.func transforms"):
        torch.func.vmap(lambda t: crit(z, t.expand(4)))(y[:, None])  # a transform over the targets only
    tangent = torch.arange(5.0).to(DEVICE)
    for backend in ("triton", "torch"):
        crit = fastlt.LogitAdjustedLoss(counts, backend=backend).to(DEVICE)
        with fwAD.dual_level():
            dual = fwAD.make_dual(crit.log_prior.clone(), tangent)
            call = lambda d=dual, c=crit: torch.func.functional_call(c, {"log_prior": d}, (z, y))  # noqa: E731
            if backend == "triton":
                with pytest.raises(RuntimeError, match="forward-mode AD"):
                    call()
                continue
            got = fwAD.unpack_dual(call()).tangent
        p = torch.softmax(z.double() + crit.log_prior.double(), 1)  # d loss / d log_prior . tangent
        want = ((p - torch.nn.functional.one_hot(y, 5)).mean(0) * tangent.double()).sum()
        torch.testing.assert_close(got.double(), want)


def test_vmap_refuses_batch_statistics_and_row_noise():
    """Under torch.func.vmap every sample is a batch of one: GCL's noise (a function of the row) drew row 0's for
    every sample (per-sample gradients 2.7 off the batch's rows, no error), and LADE's batch statistics became one
    row's (its forward ran silently; vmap(grad) failed inside F.one_hot). Both are refused by name; GCL with the
    batch's noise= passed per sample gives the batch's per-row gradients, and LADE under grad alone runs."""
    import fastlt
    from fastlt import functional as LF
    from fastlt.noise import gcl_noise

    counts = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0])
    g = torch.Generator().manual_seed(4)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 4, 1])
    gcl = fastlt.GCLLoss(counts, backend="torch").double()
    with pytest.raises(ValueError, match="row 0 of a batch of one"):
        torch.func.vmap(torch.func.grad(lambda a, t: gcl(a[None], t[None], seed=123)))(z, y)
    noise = gcl_noise(123, 4, 5, "cpu").double()
    per_sample = torch.func.vmap(torch.func.grad(lambda a, t, e: LF.gcl_cross_entropy(
        a[None], t[None], gcl.cloud, 0.5, 30.0, 1.0, noise=e[None], backend="torch")))(z, y, noise)
    a = z.clone().requires_grad_()
    gcl(a, y, seed=123).backward()  # the batch's noise, 'mean' over 4 rows
    torch.testing.assert_close(per_sample / 4, a.grad)
    lade = fastlt.LADELoss(counts, backend="torch").double()
    for call in (lambda: torch.func.vmap(lambda a, t: lade(a[None], t[None]))(z, y),
                 lambda: torch.func.vmap(torch.func.grad(lambda a, t: lade(a[None], t[None])))(z, y)):
        with pytest.raises(ValueError, match="statistic of the batch"):
            call()
    a = z.clone().requires_grad_()
    lade(a, y).backward()
    torch.testing.assert_close(torch.func.grad(lambda a: lade(a, y))(z), a.grad)
    # a vmap over whole batches is not refused: jacfwd's tangents, an ensemble's models (each sees the N rows)
    for crit, kw in ((gcl, {"seed": 123}), (lade, {})):
        fwd = torch.func.jacfwd(lambda a, crit=crit, kw=kw: crit(a, y, **kw))(z)
        torch.testing.assert_close(fwd, torch.func.jacrev(lambda a, crit=crit, kw=kw: crit(a, y, **kw))(z))
        models = torch.func.vmap(lambda a, crit=crit, kw=kw: crit(a, y, **kw))(torch.stack([z, 2 * z]))
        torch.testing.assert_close(models, torch.stack([crit(z, y, **kw), crit(2 * z, y, **kw)]))
