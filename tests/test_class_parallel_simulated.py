"""Class parallel in one process: every loss on simulated class shards (:class:`fastlt.distributed.SimulatedWorld`)
against the float64 reference on the full logits. Each rank must return the full logits' loss and the reference
gradient of its own columns; uneven, unaligned (torch.chunk) and empty shards; the kernels at tiny shapes."""

import pytest
import torch
from conftest import DEVICE, class_vectors

import fastlt
from fastlt import functional as LF
from fastlt import heads as H
from fastlt import reference as R
from fastlt.distributed import ClassShard, SimulatedWorld, balanced_bounds, chunked_bounds

pytestmark = pytest.mark.distributed

F64 = torch.float64


def _run(world_size, z, y, loss_fn, *, layout="balanced", combine="all_reduce"):
    """``loss_fn(shard, local_logits, y)`` on each simulated rank: losses, the local gradients in rank order, and
    the collectives per rank."""
    world = SimulatedWorld(world_size)
    C = z.shape[1]

    def rank_fn(group):
        shard = (ClassShard.balanced(C, group, combine=combine) if layout == "balanced"
                 else ClassShard.chunked(C, group, combine=combine))
        zl = z[:, shard.start:shard.stop].detach().clone().requires_grad_()
        loss = loss_fn(shard, zl, y)
        (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(
            loss.shape)).sum().backward()
        return loss.detach(), zl.grad

    out = world.run(rank_fn)
    return [o[0] for o in out], torch.cat([o[1] for o in out], 1), world.all_reduces


def _reference(z, y, fn):
    z64 = z.detach().to(F64).requires_grad_()
    loss = fn(z64, y)
    (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=F64).reshape(loss.shape)).sum().backward()
    return loss.detach(), z64.grad


def _cases(vec, dtype):
    v = {k: t.to(dtype) for k, t in vec.items()}
    return {
        "la": dict(log_prior=v["log_prior"], tau=0.7),
        "ldam": dict(margin=v["margins"], scale=8.0),
        "gcl": dict(cloud=v["cloud"], noise_mul=0.5, seed=77, margin=0.2, scale=8.0, gamma=1.0),
        "weighted_smooth": dict(log_prior=v["log_prior"], weight=v["weight"], label_smoothing=0.15),
        "all": dict(log_prior=v["log_prior"], tau=0.5, margin=v["margins"], scale=4.0, gamma=2.0,
                    weight=v["weight"], label_smoothing=0.1),
    }


@pytest.mark.parametrize("name", ["la", "ldam", "gcl", "weighted_smooth", "all"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("world,C,layout", [(3, 37, "balanced"), (3, 9, "balanced"), (5, 37, "chunked")],
                         ids=["37over3", "9over3_empty", "37over5_chunk"])
def test_reference_path_equals_the_full_logits(name, reduction, world, C, layout):
    """Every loss x reduction; C = 37 over 3 (16/16/5), C = 9 over 3 (8/1/0: an empty shard), torch.chunk's
    unaligned 8/8/8/8/5 over 5, ignored rows."""
    gen = torch.Generator().manual_seed(C * 10 + world)
    z = torch.randn(7, C, generator=gen, dtype=F64)
    y = torch.randint(0, C, (7,), generator=gen)
    y[[1, 5]] = -100
    kw = _cases(class_vectors(C, gen), F64)[name]
    losses, grads, count = _run(world, z, y, lambda sh, zl, t: LF.adjusted_cross_entropy(
        zl, t, shard=sh, reduction=reduction, backend="torch", **kw), layout=layout)
    want, want_grad = _reference(z, y, lambda zz, t: R.adjusted_cross_entropy(zz, t, reduction=reduction, **kw))
    for loss in losses:
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, want_grad, rtol=1e-12, atol=1e-12)
    assert count == 2  # MAX, then one packed SUM


@pytest.mark.parametrize("layout", ["balanced", "chunked"])
@pytest.mark.parametrize("name", ["la", "gcl", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_path_equals_the_full_logits(name, dtype, layout):
    """The kernels (interpreter without a GPU): local partials, the collectives, the combine, and the row kernel's
    gradient of the local columns, against the float64 reference; an empty shard among them (balanced: 16/16/9/0),
    torch.chunk's starts off multiples of 8 (11/11/11/8: GCL's tiles then shifted off the Philox groups, the same
    numbers)."""
    gen = torch.Generator().manual_seed(3)
    C = 41
    z = torch.randn(6, C, generator=gen).to(dtype)
    y = torch.randint(0, C, (6,), generator=gen)
    y[2] = -100
    vec = class_vectors(C, gen)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in _cases(vec, torch.float32)[name].items()}
    losses, grads, _ = _run(4, z.to(DEVICE), y.to(DEVICE), lambda sh, zl, t: LF.adjusted_cross_entropy(
        zl, t, shard=sh, backend="triton", **kw), layout=layout)
    want, want_grad = _reference(z.to(F64), y, lambda zz, t: R.adjusted_cross_entropy(
        zz, t, **{k: (v.to(F64) if isinstance(v, torch.Tensor) else v) for k, v in _cases(vec, F64)[name].items()}))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=2e-5, atol=2e-5)
    for loss in losses:
        assert loss.dtype == dtype
        torch.testing.assert_close(loss.cpu().to(F64), want, **tol)
    torch.testing.assert_close(grads.cpu().to(F64), want_grad, **tol)


@pytest.mark.parametrize("combine", ["all_reduce", "gather"])
@pytest.mark.parametrize("loss,backend", [("ce", "torch"), ("ce", "triton"), ("lade", "torch")])  # (LADE: reference)
def test_rows_masked_with_minus_inf(loss, backend, combine):
    """An ignored row masked whole with -inf and a valid row whose first rank holds only -inf: the loss and the
    gradients of the full logits' float64 reference, finite (the reference path's shards gave the ignored row a
    NaN gradient through exp(-inf - -inf), and LADE's class sums took -inf * 0 as NaN)."""
    gen = torch.Generator().manual_seed(11)
    C = 41
    z = torch.randn(6, C, generator=gen, dtype=F64)
    y = torch.randint(0, C, (6,), generator=gen)
    y[2], z[2] = -100, float("-inf")
    y[4], z[4, :11] = 30, float("-inf")
    pi = torch.softmax(torch.randn(C, generator=gen, dtype=F64), 0)
    dtype = F64 if backend == "torch" else torch.float32
    zd, pid = z.to(DEVICE, dtype), pi.to(DEVICE, dtype)
    if loss == "ce":
        def fn(sh, zl, t):
            return LF.adjusted_cross_entropy(zl, t, shard=sh, backend=backend, log_prior=torch.log(pid), tau=0.5)
        want, want_grad = _reference(z, y, lambda q, t: R.adjusted_cross_entropy(q, t, log_prior=torch.log(pi),
                                                                                  tau=0.5))
    else:
        def fn(sh, zl, t):
            return LF.lade_loss(zl, t, pid, shard=sh, backend=backend)
        want, want_grad = _reference(z, y, lambda q, t: R.lade_loss(q, t, pi))
    losses, grads, _ = _run(4, zd, y.to(DEVICE), fn, combine=combine)
    tol = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    assert torch.isfinite(grads).all()
    for got in losses:
        torch.testing.assert_close(got.cpu().to(F64), want, **tol)
    torch.testing.assert_close(grads.cpu().to(F64), want_grad, **tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["la", "gcl", "all"])
@pytest.mark.parametrize("world,C", [(3, 37), (3, 9)], ids=["37over3", "9over3_empty"])
def test_gather_combine_is_one_collective_and_the_same_bits_on_every_rank(backend, name, world, C):
    """combine='gather': one all-gather of the partials, combined in rank order: the reference's loss and gradient,
    and the same loss bits on every rank (float64 reference path; fp32 kernels)."""
    gen = torch.Generator().manual_seed(C + world)
    dtype = F64 if backend == "torch" else torch.float32
    z = torch.randn(5, C, generator=gen, dtype=F64)
    y = torch.randint(0, C, (5,), generator=gen)
    y[1] = -100
    vec = class_vectors(C, gen)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and backend == "triton" else v)
          for k, v in _cases(vec, dtype)[name].items()}
    dev = DEVICE if backend == "triton" else "cpu"
    losses, grads, count = _run(world, z.to(dtype).to(dev), y.to(dev), lambda sh, zl, t: LF.adjusted_cross_entropy(
        zl, t, shard=sh, backend=backend, **kw), combine="gather")
    want, want_grad = _reference(z.to(dtype), y, lambda zz, t: R.adjusted_cross_entropy(
        zz, t, **{k: (v.to(F64) if isinstance(v, torch.Tensor) else v) for k, v in _cases(vec, dtype)[name].items()}))
    tol = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    for loss in losses:
        assert torch.equal(loss, losses[0])
        torch.testing.assert_close(loss.cpu().to(F64), want, **tol)
    torch.testing.assert_close(grads.cpu().to(F64), want_grad, **tol)
    assert count == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inaturalist_over_8_ranks_in_torch_chunks_layout(backend):
    """8142 classes over 8 ranks, torch.chunk's 1018 per rank (every start but the first off a multiple of 8): GCL
    with label smoothing and LA equal the full logits (float64 reference path; the kernels in fp32)."""
    gen = torch.Generator().manual_seed(8142)
    C = 8142
    dtype = F64 if backend == "torch" else torch.float32
    dev = "cpu" if backend == "torch" else DEVICE
    z = torch.randn(2, C, generator=gen, dtype=F64)
    y = torch.tensor([5000, 17])
    vec = class_vectors(C, gen)
    for kw in (dict(cloud=vec["cloud"], noise_mul=0.5, seed=3, margin=0.1, scale=16.0, label_smoothing=0.1),
               dict(log_prior=vec["log_prior"], tau=1.0)):
        losses, grads, _ = _run(8, z.to(dev, dtype), y.to(dev), lambda sh, zl, t, kw=kw: LF.adjusted_cross_entropy(
            zl, t, shard=sh, backend=backend, **{k: (v.to(dev, dtype) if isinstance(v, torch.Tensor) else v)
                                                 for k, v in kw.items()}), layout="chunked")
        want, want_grad = _reference(z.to(dtype), y, lambda zz, t, kw=kw: R.adjusted_cross_entropy(
            zz, t, **{k: (v.to(dtype).to(F64) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}))
        tol = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=1e-6)
        for loss in losses:
            torch.testing.assert_close(loss.cpu().to(F64), want, **tol)
        torch.testing.assert_close(grads.cpu().to(F64), want_grad, **tol)


@pytest.mark.parametrize("layout", ["balanced", "chunked"])
def test_lade_and_the_modules(layout):
    """LADE sharded (its column statistics complete per shard, LADER's per-class sum in the SUM) and the loss
    modules with shard=."""
    gen = torch.Generator().manual_seed(9)
    C = 29
    counts = torch.randint(1, 200, (C,), generator=gen)
    z = torch.randn(8, C, generator=gen, dtype=F64)
    y = torch.randint(0, C, (8,), generator=gen)
    y[3] = -100
    w = torch.rand(C, generator=gen, dtype=F64) + 0.5
    pi = fastlt.priors.prior(counts).to(F64)
    losses, grads, count = _run(3, z, y, lambda sh, zl, t: LF.lade_loss(zl, t, pi, 0.3, 0.1, weight=w,
                                                                        label_smoothing=0.1, shard=sh), layout=layout)
    want, want_grad = _reference(z, y, lambda zz, t: R.lade_loss(zz, t, pi, 0.3, 0.1, weight=w, label_smoothing=0.1))
    for loss in losses:
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads, want_grad, rtol=1e-12, atol=1e-12)
    assert count == 2
    for make in (lambda sh: fastlt.LogitAdjustedLoss(counts, tau=0.5, shard=sh, backend="torch"),
                 lambda sh: fastlt.LDAMLoss(counts, shard=sh, backend="torch"),
                 lambda sh: fastlt.LADELoss(counts, shard=sh, backend="torch")):
        losses, grads, _ = _run(3, z, y, lambda sh, zl, t, make=make: make(sh).double()(zl, t), layout=layout)
        want, want_grad = _reference(z, y, lambda zz, t, make=make: make(None).double()(zz, t))
        torch.testing.assert_close(losses[0], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads, want_grad, rtol=1e-12, atol=1e-12)


def test_bounds_and_errors():
    assert balanced_bounds(37, 3) == [(0, 16), (16, 32), (32, 37)]
    assert balanced_bounds(9, 3) == [(0, 8), (8, 9), (9, 9)]
    assert chunked_bounds(8142, 8)[:2] == [(0, 1018), (1018, 2036)] and chunked_bounds(9, 4)[-1] == (9, 9)
    assert sum(b - a for a, b in balanced_bounds(1_000_003, 64)) == 1_000_003
    with pytest.raises(ValueError, match="stop"):
        ClassShard(5, 4, 10, object())
    with pytest.raises(ValueError, match="group"):
        ClassShard(0, 4, 10, None)
    with pytest.raises(ValueError, match="combine"):
        ClassShard(0, 4, 10, object(), combine="ring")
    world = SimulatedWorld(2)

    def bad(group):
        sh = ClassShard.balanced(10, group)
        with pytest.raises(ValueError, match="shard holds"):
            LF.adjusted_cross_entropy(torch.zeros(2, sh.size + 1), torch.zeros(2, dtype=torch.long), shard=sh)
        with pytest.raises(ValueError, match="grad_in_forward"):
            LF.adjusted_cross_entropy(torch.zeros(2, sh.size), torch.zeros(2, dtype=torch.long), shard=sh,
                                      grad_in_forward=True)
        with pytest.raises(ValueError, match="class"):
            LF.adjusted_cross_entropy(torch.zeros(2, sh.size), torch.full((2,), 10), shard=sh)  # global C = 10
        # a learnable class vector: the kernels would give it no gradient (the reference path does)
        learned = torch.zeros(10, requires_grad=True)
        with pytest.raises(ValueError, match="^log_prior requires grad"):
            LF.adjusted_cross_entropy(torch.zeros(2, sh.size), torch.zeros(2, dtype=torch.long), shard=sh,
                                      log_prior=learned, backend="triton")
        with pytest.raises(ValueError, match="^weight_classes requires grad"):
            H.linear_cross_entropy(torch.zeros(2, 3), torch.zeros(sh.size, 3), torch.zeros(2, dtype=torch.long),
                                   weight_classes=learned + 1, shard=sh, backend="triton")
        return 0

    world.run(bad)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_learnable_class_vectors_get_their_gradient_once_over_the_ranks(label_smoothing, reduction):
    """The reference path under shard= with (C,) class vectors that require grad (weight, log_prior, margin): each
    rank's gradient is the single-process gradient on its own classes and 0 elsewhere, so their sum over the ranks
    is the whole (what DDP would average to, times W). The class weight's was the whole on every rank when labels
    smoothing was off (twice it once added) and wrong off the rank's classes with smoothing."""
    gen = torch.Generator().manual_seed(8)
    C, N = 10, 6
    z = torch.randn(N, C, generator=gen, dtype=F64)
    y = torch.tensor([1, 2, 6, 9, 6, -100])
    vectors = dict(weight=torch.rand(C, generator=gen, dtype=F64) + 0.1,
                   log_prior=torch.randn(C, generator=gen, dtype=F64), margin=torch.rand(C, generator=gen, dtype=F64))
    kw = dict(label_smoothing=label_smoothing, reduction=reduction, scale=2.0)
    leaves = {k: v.clone().requires_grad_() for k, v in vectors.items()}
    R.adjusted_cross_entropy(z, y, **leaves, **kw).backward()

    def rank_fn(group):
        shard = ClassShard.balanced(C, group)
        mine = {k: v.clone().requires_grad_() for k, v in vectors.items()}
        LF.adjusted_cross_entropy(z[:, shard.start:shard.stop], y, shard=shard, backend="torch", **mine,
                                  **kw).backward()
        return (shard.start, shard.stop), {k: v.grad for k, v in mine.items()}

    out = SimulatedWorld(2).run(rank_fn)
    for name, leaf in leaves.items():
        total = sum(grads[name] for _, grads in out)
        torch.testing.assert_close(total, leaf.grad, rtol=1e-12, atol=1e-12, msg=name)
        for (start, stop), grads in out:
            outside = torch.ones(C, dtype=torch.bool)
            outside[start:stop] = False
            assert not grads[name][outside].any(), name


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_modules_on_a_world_with_an_empty_shard(backend):
    """20 classes in blocks of 8 over 4 ranks: the last rank's shard is empty, (N, 0) local logits. The functions
    took it; the modules refused it ('at least one class'). Every module's loss on every rank is the full one."""
    gen = torch.Generator().manual_seed(12)
    C = 20
    counts = torch.randint(1, 200, (C,), generator=gen)
    dtype = F64 if backend == "torch" else torch.float32
    z = torch.tanh(torch.randn(6, C, generator=gen, dtype=F64)).to(dtype)
    y = torch.randint(0, C, (6,), generator=gen)
    makers = {"la": lambda sh: fastlt.LogitAdjustedLoss(counts, shard=sh, backend=backend),
              "ldam": lambda sh: fastlt.LDAMLoss(counts, s=4.0, shard=sh, backend=backend),
              "gcl": lambda sh: fastlt.GCLLoss(counts, s=4.0, noise_mul=0.5, shard=sh, backend=backend)}
    for name, make in makers.items():
        kw = {"seed": 3} if name == "gcl" else {}

        def loss_fn(sh, zl, t, make=make, kw=kw):
            mod = make(sh)
            return (mod.double() if backend == "torch" else mod.to(DEVICE))(zl.to(DEVICE), t.to(DEVICE), **kw)

        losses, _, _ = _run(4, z, y, loss_fn)
        want = make(None)
        want = (want.double() if backend == "torch" else want.to(DEVICE))(z.to(DEVICE), y.to(DEVICE), **kw)
        for loss in losses:
            torch.testing.assert_close(loss.cpu(), want.detach().cpu(), rtol=1e-5, atol=1e-6, msg=name)


def test_kernel_path_compiles_with_its_backward():
    """shard= on the kernels under torch.compile(fullgraph=True) with a backward: the finish op's registered backward
    launched the row kernel itself, so AOT tracing ran a launch on fake tensors ('invalid python storage'); the
    gradient is an op of its own now (fastlt::shard_grad); with class weights the weights' sum was a
    cached_property, whose RLock Dynamo cannot enter. Loss and local gradients equal eager's."""
    gen = torch.Generator().manual_seed(13)
    C, N = 16, 5
    counts = torch.randint(1, 100, (C,), generator=gen)
    z = torch.randn(N, C, generator=gen).to(DEVICE)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)

    def rank_fn(group):
        shard = ClassShard.balanced(C, group)
        crit = fastlt.LogitAdjustedLoss(counts, label_smoothing=0.1, weight=torch.linspace(0.5, 1.5, C),
                                        backend="triton", shard=shard).to(DEVICE)
        out = []
        for step in (lambda a: crit(a, y), torch.compile(lambda a: crit(a, y), fullgraph=True, backend="aot_eager")):
            zl = z[:, shard.start:shard.stop].clone().requires_grad_()
            loss = step(zl)
            loss.backward()
            out.append((loss.detach(), zl.grad))
        return out

    torch._dynamo.reset()
    # (the simulated world runs each rank's function once per round of collectives: a compile per run and rank)
    with torch._dynamo.config.patch(recompile_limit=64):
        results = SimulatedWorld(2).run(rank_fn)
    for (eager_loss, eager_grad), (loss, grad) in results:
        torch.testing.assert_close(loss, eager_loss)
        torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("name", ["la", "ldam"])
def test_reference_path_in_bfloat16_equals_one_process(name):
    """bf16 logits near 300 (2 apart): the single-process reference computes in float32, and so must a class shard's
    (it added the prior and margin in bf16: LA 5.906 for 6.219, LDAM 43.0 for 45.0 over 2 ranks)."""
    gen = torch.Generator().manual_seed(3)
    C = 12
    z = (300 + torch.randn(6, C, generator=gen)).bfloat16()
    y = torch.randint(0, C, (6,), generator=gen)
    kw = _cases(class_vectors(C, gen), torch.float32)[name]
    losses, _, _ = _run(2, z, y, lambda sh, zl, t: LF.adjusted_cross_entropy(zl, t, shard=sh, backend="torch", **kw))
    want = R.adjusted_cross_entropy(z, y, **kw)
    for loss in losses:
        assert loss.dtype == torch.bfloat16
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
