"""Inputs the Triton paths cannot honour are refused with a ValueError naming them, where they used to give a
silently wrong result: class-probability targets that require grad (the kernels do not differentiate the targets;
the reference path does), broadcast or overlapping logits with grad_in_forward (the gradient of several rows
written over one row's memory), and learnable (C,) class tensors (a prior, margins, class weights: the kernels take
them as constants)."""

import pytest
import torch
from conftest import DEVICE, long_tail_counts

import fastlt
from fastlt import functional as LF
from fastlt import heads as H
from fastlt import reference as R
from fastlt.priors import prior

N, C, D = 5, 8, 4


def _soft(gen):
    return torch.softmax(torch.randn(N, C, generator=gen), 1).to(DEVICE)


def _calls(gen, backend):
    counts = long_tail_counts(C, gen)
    w = torch.randn(C, D, generator=gen).to(DEVICE)
    return {
        "functional": lambda z, f, q: LF.adjusted_cross_entropy(z, q, label_smoothing=0.1, backend=backend),
        "module": lambda z, f, q: fastlt.LogitAdjustedLoss(counts, backend=backend).to(DEVICE)(z, q),
        "lade": lambda z, f, q: LF.lade_loss(z, q, prior(counts).to(DEVICE), backend=backend),
        "linear head": lambda z, f, q: H.linear_cross_entropy(f, w, q, backend=backend),
        "lade head": lambda z, f, q: H.lade_linear_loss(f, w, q, prior(counts).to(DEVICE), backend=backend),
    }


@pytest.mark.parametrize("name", ["functional", "module", "lade", "linear head", "lade head"])
def test_class_probabilities_that_require_grad_are_refused_by_the_kernels(name):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()
    f = torch.randn(N, D, generator=gen).to(DEVICE).requires_grad_()
    q = _soft(gen)
    call = _calls(gen, "triton")[name]
    with pytest.raises(ValueError, match="target.*do not differentiate class-probability targets"):
        call(z, f, q.requires_grad_())
    detached = call(z, f, q.detach())  # a teacher's probabilities, detached: fine
    with torch.no_grad():  # nothing is differentiated: fine too
        torch.testing.assert_close(call(z, f, q), detached)


def test_the_reference_differentiates_class_probabilities():
    """What the kernels refuse to drop: torch's own gradient for the targets, which backend='torch' gives."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    q = torch.softmax(torch.randn(N, C, generator=gen, dtype=torch.float64), 1).requires_grad_()
    LF.adjusted_cross_entropy(z, q, label_smoothing=0.1, backend="torch").backward()
    q2 = q.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(z, q2, label_smoothing=0.1).backward()
    torch.testing.assert_close(q.grad, q2.grad)


def test_grad_in_forward_refuses_broadcast_logits():
    gen = torch.Generator().manual_seed(2)
    lin = torch.nn.Linear(3, C).to(DEVICE)
    x = torch.randn(1, 3, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="grad_in_forward.*broadcast"):
        LF.adjusted_cross_entropy(lin(x).expand(N, C), y, backend="triton", grad_in_forward=True)
    crit = fastlt.LogitAdjustedLoss(torch.arange(1, C + 1), grad_in_forward=True, backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match="grad_in_forward.*broadcast"):
        crit(lin(x).expand(N, C), y)
    # made contiguous, the same logits are fine, and give torch's gradient
    loss = crit(lin(x).expand(N, C).contiguous(), y)
    loss.backward()
    got = lin.weight.grad.clone()
    lin.zero_grad()
    z = lin(x).expand(N, C)
    torch.nn.functional.cross_entropy(z + torch.log(fastlt.priors.prior(torch.arange(1, C + 1))).to(DEVICE),
                                      y).backward()
    torch.testing.assert_close(got, lin.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("view", ["view", "slice", "unbatched", "positions"])
def test_grad_in_forward_refuses_a_view_of_a_leaf(view):
    """Logits that are a view of a parameter (``P.view(N, C)``, ``P[:, :]``, an unbatched (C,) or (N, C, 1) leaf the
    dispatch makes rows of): the parameter's values were replaced by its gradient, no error (only a leaf itself was
    refused). A module's path refuses it too; the parameter keeps its values."""
    gen = torch.Generator().manual_seed(6)
    shape = {"view": (N * C,), "slice": (N, C), "unbatched": (C,), "positions": (N, C, 1)}[view]
    P = torch.randn(shape, generator=gen).to(DEVICE).requires_grad_()
    before = P.detach().clone()
    logits = {"view": lambda: P.view(N, C), "slice": lambda: P[:, :], "unbatched": lambda: P,
              "positions": lambda: P}[view]()
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    y = {"unbatched": y[0], "positions": y[:, None]}.get(view, y)
    with pytest.raises(ValueError, match="grad_in_forward.*view of one"):
        LF.adjusted_cross_entropy(logits, y, backend="triton", grad_in_forward=True)
    crit = fastlt.LogitAdjustedLoss(torch.arange(1, C + 1), grad_in_forward=True, backend="triton").to(DEVICE)
    with pytest.raises(ValueError, match="grad_in_forward.*view of one"):
        crit(logits, y)
    assert torch.equal(P.detach(), before)


def test_grad_in_forward_refuses_overlapping_logits():
    """An unfold's windows (strides (1, 1)): rows share elements as a broadcast's do, and the gradient written
    over them was wrong silently (0.75 off in the weight gradient)."""
    gen = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(3, N + C - 1).to(DEVICE)
    x = torch.randn(1, 3, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    with pytest.raises(ValueError, match="grad_in_forward.*share memory.*unfold"):
        LF.adjusted_cross_entropy(lin(x)[0].unfold(0, C, 1), y, backend="triton", grad_in_forward=True)


def _offsets_repeat(t) -> bool:
    index = torch.zeros((), dtype=torch.long)
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        shape = [1] * t.dim()
        shape[dim] = size
        index = index + (torch.arange(size) * stride).view(shape)
    return index.numel() != index.unique().numel()


def test_overlap_check_against_every_offset():
    """``_elements_overlap`` never misses an overlap (brute force over random strides) and passes every layout made
    by permuting and slicing a tensor (which cannot overlap)."""
    from fastlt._glue import _elements_overlap

    rng = torch.Generator().manual_seed(5)
    for _ in range(300):
        shape = torch.randint(1, 5, (3,), generator=rng).tolist()
        strides = torch.randint(0, 13, (3,), generator=rng).tolist()
        t = torch.empty(200).as_strided(shape, strides)
        if _offsets_repeat(t):
            assert _elements_overlap(t), (shape, strides)
    base = torch.empty(4, 6, 5)
    for view in (base, base.transpose(0, 2), base[:, ::2], base.permute(2, 0, 1)[1:, :, ::3], base[..., 0],
                 base.contiguous(memory_format=torch.contiguous_format)[None].expand(1, 4, 6, 5),
                 torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)):
        assert not _elements_overlap(view), (tuple(view.shape), view.stride())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detached"])
def test_grad_in_forward_leaves_the_logits_alone_when_no_gradient_is_wanted(mode):
    """A validation loop with the training criterion (``grad_in_forward=True``) under ``torch.no_grad()``,
    ``torch.inference_mode()`` or on detached logits: the logits keep their values (the accuracy computed from them
    afterwards is right; they were overwritten with the gradient) and the loss is the same."""
    gen = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(3, C).to(DEVICE)
    x = torch.randn(N, 3, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    counts = torch.arange(1, C + 1)
    fused = fastlt.GCLLoss(counts, s=8.0, grad_in_forward=True, backend="triton").to(DEVICE)
    plain = fastlt.GCLLoss(counts, s=8.0, backend="triton").to(DEVICE)
    context = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(mode, torch.enable_grad)
    with context():
        z = lin(x)
        z = z.detach() if mode == "detached" else z
        before = z.clone()
        loss = fused(z, y, seed=4)
        assert torch.equal(z, before)
        torch.testing.assert_close(loss, plain(z, y, seed=4), rtol=0, atol=0)


def _class_tensor_calls(gen):
    """Calls on the kernels passing one learnable (C,) tensor ``v`` (positive): (name the error gives, call)."""
    w = torch.randn(C, D, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    return {
        "log_prior": ("log_prior", lambda z, f, v: LF.adjusted_cross_entropy(z, y, log_prior=v.log(),
                                                                             backend="triton")),
        "class weights": ("weight", lambda z, f, v: LF.adjusted_cross_entropy(z, y, weight=v, backend="triton")),
        "LDAM margins": ("margin", lambda z, f, v: LF.ldam_cross_entropy(z, y, v, s=4.0, backend="triton")),
        "GCL cloud": ("cloud", lambda z, f, v: LF.gcl_cross_entropy(torch.tanh(z), y, v, seed=1, backend="triton")),
        "LADE prior": ("prior", lambda z, f, v: LF.lade_loss(z, y, v / v.sum(), backend="triton")),
        "head log_prior": ("log_prior", lambda z, f, v: H.linear_cross_entropy(f, w, y, log_prior=v.log(),
                                                                               backend="triton")),
        "head class weights": ("weight_classes", lambda z, f, v: H.linear_cross_entropy(f, w, y, weight_classes=v,
                                                                                       backend="triton")),
        "LADE head prior": ("prior", lambda z, f, v: H.lade_linear_loss(f, w, y, v / v.sum(), backend="triton")),
    }


@pytest.mark.parametrize("case", list(_class_tensor_calls(torch.Generator())))
def test_class_tensors_that_require_grad_are_refused_by_the_kernels(case):
    """A learnable prior, margin, cloud or class weight: the kernels take the (C,) tensors as constants, so it got
    no gradient, silently, where backend='torch' gives one. Refused (with grad mode on); detached it runs, and under
    torch.no_grad it runs too and is not cached, so the next call with grad mode on is refused again."""
    gen = torch.Generator().manual_seed(2)
    name, call = _class_tensor_calls(gen)[case]
    z = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()
    f = torch.randn(N, D, generator=gen).to(DEVICE).requires_grad_()
    v = (torch.rand(C, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    with pytest.raises(ValueError, match=f"^{name} requires grad.*backend='torch'"):
        call(z, f, v)
    detached = call(z, f, v.detach())
    with torch.no_grad():
        torch.testing.assert_close(call(z, f, v), detached)
    with pytest.raises(ValueError, match=f"^{name} requires grad"):
        call(z, f, v)


def test_the_reference_differentiates_class_tensors():
    """What the kernels refuse to drop: the reference path's gradient for a learnable log prior."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(N, C, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=gen)
    b = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
    LF.adjusted_cross_entropy(z, y, log_prior=b, backend="torch").backward()
    b2 = b.detach().clone().requires_grad_()
    torch.nn.functional.cross_entropy(z + b2, y).backward()
    torch.testing.assert_close(b.grad, b2.grad)


def test_a_cached_class_tensor_made_to_require_grad_in_place_is_refused():
    """A class tensor the kernels' arguments cache already holds, then made learnable in place
    (``requires_grad_()``: the same id and version, so a cache hit): it was taken as a constant with no error and no
    gradient. Functions, a loss module's buffer, LADE and the heads."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(C, D, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    pos = (torch.rand(C, generator=gen) + 0.5).to(DEVICE)
    calls = {
        "log_prior": lambda z, f, v: LF.adjusted_cross_entropy(z, y, log_prior=v, backend="triton"),
        "weight": lambda z, f, v: LF.adjusted_cross_entropy(z, y, weight=v, backend="triton"),
        "margin": lambda z, f, v: LF.ldam_cross_entropy(z, y, v, s=4.0, backend="triton"),
        "prior": lambda z, f, v: LF.lade_loss(z, y, v, backend="triton"),
        "weight_classes": lambda z, f, v: H.linear_cross_entropy(f, w, y, weight_classes=v, backend="triton"),
    }
    for name, call in calls.items():
        v = (pos / pos.sum()).clone() if name == "prior" else pos.clone()
        z = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()
        f = torch.randn(N, D, generator=gen).to(DEVICE).requires_grad_()
        call(z, f, v)  # cached
        v.requires_grad_()
        with pytest.raises(ValueError, match=f"^{name} requires grad"):
            call(z, f, v)
    crit = fastlt.LogitAdjustedLoss(torch.arange(1, C + 1), backend="triton").to(DEVICE)
    z = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()
    crit(z, y)
    crit.log_prior.requires_grad_()
    with pytest.raises(ValueError, match="^log_prior requires grad"):
        crit(z, y)
    with torch.no_grad():  # no gradient wanted: runs
        crit(z, y)


def test_a_seed_tensor_changed_before_the_recompute_backward_raises():
    """GCL with a seed tensor (CUDA graphs) redrawn in place between the forward and the backward (a fresh seed for
    the next micro-batch): the recompute backward drew the new seed's noise against the forward's statistics, a
    wrong gradient (29 off in 5) with no error. It raises now, for the loss and a head's 'none' recompute; redrawn
    after the backward, the step is the reference's."""
    gen = torch.Generator().manual_seed(9)
    cloud = (torch.rand(C, generator=gen) + 0.1).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    w = torch.randn(C, D, generator=gen).to(DEVICE)
    calls = {
        "loss": lambda z, f, s: LF.gcl_cross_entropy(torch.tanh(z), y, cloud, 0.1, 8.0, 0.5, seed=s, backend="triton"),
        "head": lambda z, f, s: H.cosine_cross_entropy(f, w, y, cloud=cloud, noise_mul=0.5, margin=0.1, scale=8.0,
                                                        seed=s, reduction="none", backend="triton").sum(),
    }
    for name, call in calls.items():
        z = torch.randn(N, C, generator=gen).to(DEVICE).requires_grad_()
        f = torch.randn(N, D, generator=gen).to(DEVICE).requires_grad_()
        seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
        loss = call(z, f, seed)
        seed.fill_(5678)
        with pytest.raises(RuntimeError, match="seed tensor was changed in place"):
            loss.backward()
        seed.fill_(1234)
        loss = call(z, f, seed)
        loss.backward()
        seed.fill_(5678)  # after the backward: fine
        grads = (z.grad if name == "loss" else f.grad).clone()
        z64, f64 = z.detach().double().requires_grad_(), f.detach().double().requires_grad_()
        if name == "loss":
            R.gcl_cross_entropy(torch.tanh(z64), y, cloud.double(), 0.1, 8.0, 0.5, seed=1234).backward()
            torch.testing.assert_close(grads.double(), z64.grad, rtol=1e-4, atol=1e-5)
        else:
            R.reference_cosine_cross_entropy(f64, w.double(), y, cloud=cloud.double(), noise_mul=0.5, margin=0.1,
                                             scale=8.0, seed=1234, reduction="none").sum().backward()
            torch.testing.assert_close(grads.double(), f64.grad, rtol=1e-4, atol=1e-5)


def _class_tensor_cases(gen):
    """name -> (module, its input's width, the (C,) tensor to edit in place): what a recompute backward reads."""
    counts = long_tail_counts(C, gen)
    weight = torch.rand(C, generator=gen) + 0.5
    return {
        "la log_prior": lambda: (fastlt.LogitAdjustedLoss(counts, backend="triton"), C, "log_prior"),
        "la weight none": lambda: (fastlt.LogitAdjustedLoss(counts, weight=weight, reduction="none",
                                                            backend="triton"), C, "weight"),
        "ldam margins": lambda: (fastlt.LDAMLoss(counts, s=4.0, backend="triton"), C, "margins"),
        "gcl cloud": lambda: (fastlt.GCLLoss(counts, s=4.0, backend="triton"), C, "cloud"),
        "head log_prior none": lambda: (H.LinearLossHead(D, C, counts, reduction="none", backend="triton"), D,
                                        "log_prior"),
        "head weight_classes none": lambda: (H.LinearLossHead(D, C, counts, weight_classes=weight, reduction="none",
                                                              backend="triton"), D, "weight_classes"),
        "cosine head cloud none": lambda: (H.CosineGCLHead(D, C, counts, s=4.0, reduction="none", backend="triton"),
                                           D, "cloud"),
    }


@pytest.mark.parametrize("case", list(_class_tensor_cases(torch.Generator().manual_seed(0))))
def test_a_class_tensor_changed_before_the_recompute_backward_raises(case):
    """A (C,) class tensor of the loss (a module's buffer: the log prior, margins, GCL's cloud, class weights) edited
    in place between the forward and a backward that recomputes from it: the backward read the new values, a wrong
    gradient with no error (a head's 'none' log prior + arange(C): gradients 138 where 0.5 was right). It raises
    now, as autograd does for a tensor an op saved (and as the reference path's F.cross_entropy does for its class
    weights); edited after the backward, the next step uses the new values."""
    gen = torch.Generator().manual_seed(11)
    mod, width, name = _class_tensor_cases(gen)[case]()
    mod = mod.to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    x = torch.randn(N, width, generator=gen).to(DEVICE).requires_grad_()
    loss = mod(torch.tanh(x) if width == C else x, y).sum()
    with torch.no_grad():
        getattr(mod, name).mul_(1.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    mod(torch.tanh(x) if width == C else x, y).sum().backward()  # edited before the forward: runs
    with torch.no_grad():
        getattr(mod, name).mul_(1.5)  # after the backward: fine


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_class_probabilities_with_an_ignore_index_are_refused(backend):
    """Class-probability targets with a non-negative ignore_index (a module made with ignore_index=0, then a mixup
    batch): every row counts, so the index went unused silently; F.cross_entropy refuses it, and so does every path
    now, naming it. A negative one other than -100 is accepted, as F.cross_entropy accepts it."""
    gen = torch.Generator().manual_seed(10)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    q = torch.softmax(torch.randn(N, C, generator=gen), 1).to(DEVICE)
    f = torch.randn(N, D, generator=gen).to(DEVICE)
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):  # torch's own refusal
        torch.nn.functional.cross_entropy(z.cpu(), q.cpu(), ignore_index=0)
    counts = torch.arange(1, C + 1)
    calls = [lambda: LF.adjusted_cross_entropy(z, q, ignore_index=0, backend=backend),
             lambda: fastlt.LogitAdjustedLoss(counts, ignore_index=0, backend=backend).to(DEVICE)(z, q),
             lambda: fastlt.LADELoss(counts, ignore_index=0, backend=backend).to(DEVICE)(z, q),
             lambda: fastlt.LinearLossHead(D, C, counts, ignore_index=0, backend=backend).to(DEVICE)(f, q)]
    for call in calls:
        with pytest.raises(ValueError, match="ignore_index=0 is not supported with class-probability"):
            call()
    # a negative one is no class: unused, as F.cross_entropy leaves it (a criterion made with ignore_index=-1 takes
    # mixup batches)
    want = torch.nn.functional.cross_entropy(z.cpu().double(), q.cpu().double(), ignore_index=-1)
    got = LF.adjusted_cross_entropy(z, q, ignore_index=-1, backend=backend)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
    got = fastlt.LogitAdjustedLoss(torch.ones(C), tau=0.0, ignore_index=-1, backend=backend).to(DEVICE)(z, q)
    torch.testing.assert_close(got.cpu().double(), want, rtol=1e-5, atol=1e-6)
