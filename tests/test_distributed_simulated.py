"""Data parallel in one process: the real ``dp_group`` code of every loss and head on simulated ranks
(:class:`fastlt.distributed.SimulatedWorld`) against the float64 reference on the concatenated batch.

On each rank the loss must equal the global batch's, and the rank's gradient divided by the world size (what DDP's
averaging does to the parameters' gradients) must equal the reference gradient of its rows. The reference path is
checked in float64 (to ~1e-12), the kernels (the interpreter without a GPU) at tiny shapes in fp32 and bf16.
"""

import math

import pytest
import torch
from conftest import DEVICE, class_vectors, long_tail_counts

from fastlt import functional as LF
from fastlt import heads as H
from fastlt import reference as R
from fastlt.distributed import SimulatedWorld, global_logsumexp, global_sum, noise_row_offset
from fastlt.noise import gcl_noise
from fastlt.priors import prior

pytestmark = pytest.mark.distributed

F64 = torch.float64


def _run(sizes, inputs: dict, loss_fn, *, grads=("x",), shared=()):
    """Split every (N, ...) tensor of ``inputs`` by rows into ``sizes`` (``shared`` names are whole on every rank),
    run ``loss_fn(group, **local)`` (a loss; backward of its sum) on each simulated rank. Returns the per-rank
    losses, per-name lists of the ranks' gradients, and the world's all-reduce count."""
    world = SimulatedWorld(len(sizes))
    parts = {k: (None if k in shared else torch.split(v, sizes)) for k, v in inputs.items()}

    def rank_fn(group):
        local = {k: (inputs[k] if parts[k] is None else parts[k][group.rank]) for k in inputs}
        local = {k: (v.detach().clone().requires_grad_() if k in grads else v) for k, v in local.items()}
        loss = loss_fn(group, **local)
        loss.sum().backward()
        return loss.detach(), {k: local[k].grad for k in grads}

    out = world.run(rank_fn)
    return [o[0] for o in out], {k: [o[1][k] for o in out] for k in grads}, world.all_reduces


def _reference(inputs: dict, loss_fn, grads=("x",)):
    leaves = {k: (v.detach().clone().to(F64).requires_grad_() if k in grads else v) for k, v in inputs.items()}
    loss = loss_fn(**leaves)
    loss.sum().backward()
    return loss.detach(), {k: leaves[k].grad for k in grads}


def _case(N, C, seed, *, ignore=(), dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen).to(dtype)
    y = torch.randint(0, C, (N,), generator=gen)
    y[list(ignore)] = -100
    return x, y, class_vectors(C, gen)


LOSSES = ["la", "balanced_softmax", "ldam", "gcl", "lade"]


def _rank_noise(sizes, C, seed):
    """GCL's noise of ranks holding ``sizes`` rows with ``rows_per_rank = max(sizes)``: rank r's rows are noise rows
    ``r * max(sizes) + i`` (the concatenated batch's own rows only when the sizes are equal)."""
    per = max(sizes)
    return torch.cat([gcl_noise(seed, n, C, row_offset=r * per) for r, n in enumerate(sizes)]).to(F64)


def _losses(name, vec, dtype, *, weight, label_smoothing, reduction, backend, sizes):
    """``(dp(group, x, y), ref(x, y))``: the functional loss with ``dp_group`` on ranks of ``sizes`` rows and its
    float64 reference."""
    common = dict(weight=None if weight is None else weight.to(dtype), reduction=reduction,
                  label_smoothing=label_smoothing)
    ref_common = dict(common, weight=None if weight is None else weight.to(F64))
    v = {k: t.to(dtype) for k, t in vec.items()}
    v64 = {k: t.to(F64) for k, t in vec.items()}
    pi = torch.softmax(vec["log_prior"].to(F64), 0)
    if name == "la":
        return (lambda g, x, y: LF.logit_adjusted_cross_entropy(x, y, v["log_prior"], 0.7, backend=backend,
                                                                dp_group=g, **common),
                lambda x, y: R.logit_adjusted_cross_entropy(x, y, v64["log_prior"], 0.7, **ref_common))
    if name == "balanced_softmax":
        return (lambda g, x, y: LF.balanced_softmax_cross_entropy(x, y, v["log_prior"], backend=backend,
                                                                  dp_group=g, **common),
                lambda x, y: R.balanced_softmax_cross_entropy(x, y, v64["log_prior"], **ref_common))
    if name == "ldam":
        return (lambda g, x, y: LF.ldam_cross_entropy(x, y, v["margins"], 5.0, backend=backend, dp_group=g, **common),
                lambda x, y: R.ldam_cross_entropy(x, y, v64["margins"], 5.0, **ref_common))
    if name == "gcl":
        noise = _rank_noise(sizes, v["cloud"].shape[0], 1234)
        return (lambda g, x, y: LF.gcl_cross_entropy(x, y, v["cloud"], 0.1, 8.0, 0.5, 1.0, seed=1234, backend=backend,
                                                     dp_group=g, rows_per_rank=max(sizes), **common),
                lambda x, y: R.gcl_cross_entropy(x, y, v64["cloud"], 0.1, 8.0, 0.5, 1.0, noise=noise, **ref_common))
    return (lambda g, x, y: LF.lade_loss(x, y, pi.to(dtype), 0.2, 0.1, backend=backend, dp_group=g, **common),
            lambda x, y: R.lade_loss(x, y, pi, 0.2, 0.1, **ref_common))


def _check(sizes, x, y, dp_fn, ref_fn, reduction, *, rtol, atol):
    losses, grads, _ = _run(sizes, dict(x=x, y=y), dp_fn)
    want, want_grad = _reference(dict(x=x, y=y), ref_fn)
    scale = 1 if reduction == "none" else len(sizes)  # DDP divides the summed gradient by the world size
    if reduction == "none":
        torch.testing.assert_close(torch.cat(losses).to(F64), want, rtol=rtol, atol=atol)
    else:
        for loss in losses:
            torch.testing.assert_close(loss.to(F64), want, rtol=rtol, atol=atol)
    got = torch.cat(grads["x"]).to(F64) / scale
    torch.testing.assert_close(got, want_grad["x"], rtol=rtol, atol=atol)


@pytest.mark.parametrize("name,reduction", [(n, r) for n in LOSSES for r in ("mean", "sum", "none")
                                            if (n, r) != ("lade", "none")])  # LADE has no per-row loss
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_reference_path_equals_the_concatenated_batch(name, reduction, weighted, label_smoothing):
    """Uneven ranks (6, 2, 5 rows), ignored rows, every loss, weight, smoothing and reduction, float64."""
    x, y, vec = _case(13, 11, 7, ignore=(1, 7, 12))
    dp_fn, ref_fn = _losses(name, vec, F64, weight=vec["weight"] if weighted else None,
                            label_smoothing=label_smoothing, reduction=reduction, backend="torch", sizes=[6, 2, 5])
    _check([6, 2, 5], x, y, dp_fn, ref_fn, reduction, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_a_rank_whose_rows_are_all_ignored_or_empty(name):
    """A rank of ignored rows only and an empty rank: they still take part in the collectives; the rest of the
    world's loss and gradients are the concatenated batch's, and theirs are 0 (not NaN)."""
    x, y, vec = _case(9, 7, 3, ignore=(3, 4))
    dp_fn, ref_fn = _losses(name, vec, F64, weight=vec["weight"], label_smoothing=0.1, reduction="mean",
                            backend="torch", sizes=[3, 2, 0, 4])
    losses, grads, _ = _run([3, 2, 0, 4], dict(x=x, y=y), dp_fn)
    want, want_grad = _reference(dict(x=x, y=y), ref_fn)
    for loss in losses:
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads["x"]) / 4, want_grad["x"], rtol=1e-12, atol=1e-12)
    assert torch.all(grads["x"][1] == 0)


@pytest.mark.parametrize("name", ["la", "gcl", "lade"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_batch_without_valid_rows_gives_the_single_process_result(name, reduction, backend):
    """Every row of every rank ignored: 'mean' is NaN (as torch's), LADE's LADER 0; gradients 0, not NaN (the
    kernels' rows got NaN under 'mean': their coefficient 0 times 1 / 0)."""
    dtype = F64 if backend == "torch" else torch.float32
    x, y, vec = _case(5, 6, 4, ignore=range(5), dtype=dtype)
    dp_fn, ref_fn = _losses(name, vec, dtype, weight=None, label_smoothing=0.0, reduction=reduction, backend=backend,
                            sizes=[2, 3])
    losses, grads, _ = _run([2, 3], dict(x=x.to(DEVICE), y=y.to(DEVICE)), dp_fn)
    want, _ = _reference(dict(x=x, y=y), ref_fn)
    for loss in losses:
        torch.testing.assert_close(loss.cpu().to(F64), want, equal_nan=True)
    assert torch.all(torch.cat(grads["x"]) == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lade_with_a_class_masked_on_one_rank_and_a_learnable_prior(backend):
    """LADE under dp_group: a class masked with -inf in every row of one rank (finite on the other) gets a zero
    gradient there, not exp(-inf + inf) (NaN on the reference path); a bfloat16 prior has its log taken in fp32 (the
    reference path took it in bfloat16: ~1e-3 off); a learnable prior's gradient, averaged over the ranks as DDP
    does, is the single process's (LADER's terms in the prior counted W times before)."""
    dtype = F64 if backend == "torch" else torch.float32
    x, y, vec = _case(8, 6, 9, ignore=(2,), dtype=dtype)
    x[:4, 5] = -math.inf
    y[:4] = y[:4].clamp(max=4)
    pi = torch.softmax(vec["log_prior"].to(F64), 0)
    pi16 = pi.to(torch.bfloat16)
    losses, grads, _ = _run([4, 4], dict(x=x.to(DEVICE), y=y.to(DEVICE)), lambda g, x, y: LF.lade_loss(
        x, y, pi16.to(DEVICE), 0.2, 0.1, backend=backend, dp_group=g))
    want, want_grad = _reference(dict(x=x, y=y), lambda x, y: R.lade_loss(x, y, pi16.to(F64), 0.2, 0.1))
    tol = 1e-12 if backend == "torch" else 2e-6
    for loss in losses:
        torch.testing.assert_close(loss.cpu().to(F64), want, rtol=tol, atol=tol)
    got = torch.cat([g.cpu() for g in grads["x"]]).to(F64) / 2
    assert not got.isnan().any() and torch.all(got[:4, 5] == 0)
    torch.testing.assert_close(got, want_grad["x"], rtol=tol, atol=tol)
    if backend == "torch":  # (the kernels refuse a prior that requires grad)
        leaf = pi.clone().requires_grad_()
        R.lade_loss(x, y, leaf, 0.2, 0.1).backward()
        world = SimulatedWorld(2)

        def rank_fn(group):
            mine = pi.clone().requires_grad_()
            rows = slice(4 * group.rank, 4 * group.rank + 4)
            LF.lade_loss(x[rows], y[rows], mine, 0.2, 0.1, backend="torch", dp_group=group).backward()
            return mine.grad

        averaged = sum(world.run(rank_fn)) / 2
        torch.testing.assert_close(averaged, leaf.grad, rtol=1e-12, atol=1e-12)


def test_gcl_ranks_draw_the_rows_of_the_concatenated_batch():
    """With rows_per_rank, rank r's noise is rows [r * rows_per_rank, ...) of one draw: the union equals one process
    on the padded batch; without it (equal batches), rank r's rows start at r * N_r; a rank with more rows than
    rows_per_rank is refused."""
    x, y, vec = _case(8, 9, 5)
    cloud = vec["cloud"].to(F64)

    def dp_fn(g, x, y):
        return LF.gcl_cross_entropy(x, y, cloud, 0.0, 1.0, 1.0, seed=99, reduction="none", backend="torch",
                                    dp_group=g, rows_per_rank=5)

    losses, _, _ = _run([5, 3], dict(x=x, y=y), dp_fn)
    padded_noise = R.adjusted_logits(torch.zeros(10, 9, dtype=F64), torch.zeros(10, dtype=torch.long), cloud=cloud,
                                     noise_mul=-1.0, seed=99)  # +cloud * e
    z = torch.cat([x[:5], x[5:]]) - torch.cat([padded_noise[:5], padded_noise[5:8]])
    torch.testing.assert_close(torch.cat(losses), torch.nn.functional.cross_entropy(z, y, reduction="none"))
    assert noise_row_offset(3, 4, None) == 12 and noise_row_offset(3, 4, 6) == 18
    with pytest.raises(ValueError, match="rows_per_rank"):
        noise_row_offset(1, 7, 6)
    with pytest.raises(ValueError, match="rows_per_rank"):
        noise_row_offset(1, 2, 0)


def test_collective_counts_and_the_global_logsumexp():
    """One SUM all-reduce for a cross-entropy's 'mean'/'sum', none for 'none', one MAX and one SUM for LADE; and
    global_logsumexp / global_sum give the global value with the local gradient (0, not NaN, for -inf)."""
    x, y, vec = _case(6, 5, 2)
    for name, reduction, count in (("la", "mean", 1), ("gcl", "sum", 1), ("la", "none", 0), ("lade", "mean", 2)):
        dp_fn, _ = _losses(name, vec, F64, weight=None, label_smoothing=0.0, reduction=reduction, backend="torch",
                           sizes=[4, 2])
        assert _run([4, 2], dict(x=x, y=y), dp_fn)[2] == count, (name, reduction)

    parts = [torch.tensor([0.5, -math.inf, 2.0], dtype=F64), torch.tensor([1.5, -math.inf, -math.inf], dtype=F64)]
    want = torch.logsumexp(torch.stack(parts), 0)
    world = SimulatedWorld(2)

    def fn(g):
        lse = parts[g.rank].clone().requires_grad_()
        s = torch.tensor([float(g.rank + 1)], dtype=F64, requires_grad=True)
        value, (total,) = global_logsumexp(lse, g, s)
        (value.masked_fill(~torch.isfinite(value), 0).sum() + 3 * total.sum()).backward()
        return value.detach(), lse.grad, total.detach(), s.grad

    for r, (value, grad, total, s_grad) in enumerate(world.run(fn)):
        torch.testing.assert_close(value, want)
        torch.testing.assert_close(grad, torch.nan_to_num(torch.exp(parts[r] - want), nan=0.0))
        assert total.item() == 3.0 and s_grad.item() == 3.0
    (a, b), = SimulatedWorld(1).run(lambda g: global_sum([torch.ones(2), torch.tensor(2.0, dtype=F64)], g))
    assert a.dtype == F64 and b.item() == 2.0


@pytest.mark.parametrize("head", ["linear", "cosine_gcl", "lade"])
def test_heads_reference_path(head):
    """The heads' functions with dp_group (features and the shared class weights): the loss of the concatenated
    batch on every rank; the features' gradients / W and the weights' gradients averaged over the ranks are the
    single-process ones."""
    gen = torch.Generator().manual_seed(11)
    N, D, C = 9, 5, 7
    counts = long_tail_counts(C, gen)
    f = torch.randn(N, D, generator=gen, dtype=F64)
    w = torch.randn(C, D, generator=gen, dtype=F64)
    b = torch.randn(C, generator=gen, dtype=F64)
    y = torch.randint(0, C, (N,), generator=gen)
    y[2] = -100
    wc = torch.rand(C, generator=gen, dtype=F64) + 0.5
    vec = class_vectors(C, gen)
    if head == "linear":
        def dp(g, f, w, b, y):
            return H.linear_cross_entropy(f, w, y, b, log_prior=vec["log_prior"].to(F64), tau=0.5,
                                          weight_classes=wc, label_smoothing=0.1, backend="torch", dp_group=g)

        def ref(f, w, b, y):
            return R.reference_linear_cross_entropy(f, w, y, b, log_prior=vec["log_prior"].to(F64), tau=0.5,
                                                    weight_classes=wc, label_smoothing=0.1)
    elif head == "cosine_gcl":
        cloud = vec["cloud"].to(F64)

        def dp(g, f, w, b, y):
            return H.cosine_cross_entropy(f, w, y, cloud=cloud, noise_mul=0.5, margin=0.1, scale=8.0, seed=5,
                                          gamma=1.0, backend="torch", dp_group=g, rows_per_rank=5)

        def ref(f, w, b, y):
            return R.reference_cosine_cross_entropy(f, w, y, cloud=cloud, noise_mul=0.5, margin=0.1, scale=8.0,
                                                    seed=5, gamma=1.0)
    else:
        pi = prior(counts).to(F64)

        def dp(g, f, w, b, y):
            return H.lade_linear_loss(f, w, y, pi, b, weight_classes=wc, backend="torch", dp_group=g)

        def ref(f, w, b, y):
            return R.reference_lade_linear_loss(f, w, y, pi, b, weight_classes=wc)

    inputs = dict(f=f, w=w, b=b, y=y)
    params = ("w",) if head == "cosine_gcl" else ("w", "b")
    losses, grads, _ = _run([5, 4], inputs, dp, grads=("f", *params), shared=("w", "b"))
    want, want_grads = _reference(inputs, ref, grads=("f", *params))
    for loss in losses:
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat(grads["f"]) / 2, want_grads["f"], rtol=1e-12, atol=1e-12)
    for name in params:
        torch.testing.assert_close(sum(grads[name]) / 2, want_grads[name], rtol=1e-12, atol=1e-12)


# --- the kernels (the Triton interpreter without a GPU) at tiny shapes ----------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_equals_the_concatenated_batch(name, dtype):
    """The Triton path with dp_group ('mean', class weights, smoothing, ignored rows, uneven ranks) against the
    float64 reference on the concatenated batch, to the dtype's accuracy."""
    x, y, vec = _case(7, 10, 13, ignore=(2,), dtype=dtype)
    x = x.to(DEVICE)
    dp_fn, ref_fn = _losses(name, {k: t.to(DEVICE) for k, t in vec.items()}, dtype, weight=vec["weight"],
                            label_smoothing=0.1, reduction="mean", backend="triton", sizes=[4, 3])
    _, ref_fn = _losses(name, vec, F64, weight=vec["weight"], label_smoothing=0.1, reduction="mean",
                        backend="torch", sizes=[4, 3])
    losses, grads, _ = _run([4, 3], dict(x=x, y=y.to(DEVICE)), dp_fn)
    want, want_grad = _reference(dict(x=x.cpu().to(F64), y=y), ref_fn)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    for loss in losses:
        assert loss.dtype == dtype
        torch.testing.assert_close(loss.cpu().to(F64), want, **tol)
    torch.testing.assert_close(torch.cat(grads["x"]).cpu().to(F64) / 2, want_grad["x"], **tol)


@pytest.mark.parametrize("head", ["linear", "lade"])
def test_kernel_heads(head):
    """The fused heads' Triton path with dp_group (the LADE head through its local logits), fp32."""
    gen = torch.Generator().manual_seed(3)
    N, D, C = 6, 8, 9
    f = torch.randn(N, D, generator=gen)
    w = torch.randn(C, D, generator=gen)
    y = torch.randint(0, C, (N,), generator=gen)
    pi = prior(long_tail_counts(C, gen))
    if head == "linear":
        def dp(g, f, w, y):
            return H.linear_cross_entropy(f, w, y, label_smoothing=0.1, backend="triton", dp_group=g)

        def ref(f, w, y):
            return R.reference_linear_cross_entropy(f, w, y, label_smoothing=0.1)
    else:
        def dp(g, f, w, y):
            return H.lade_linear_loss(f, w, y, pi.to(DEVICE), backend="triton", dp_group=g)

        def ref(f, w, y):
            return R.reference_lade_linear_loss(f, w, y, pi.to(F64))
    inputs = dict(f=f.to(DEVICE), w=w.to(DEVICE), y=y.to(DEVICE))
    losses, grads, _ = _run([2, 4], inputs, dp, grads=("f", "w"), shared=("w",))
    want, want_grads = _reference(dict(f=f, w=w, y=y), ref, grads=("f", "w"))
    for loss in losses:
        torch.testing.assert_close(loss.cpu().to(F64), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(grads["f"]).cpu().to(F64) / 2, want_grads["f"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((sum(grads["w"]) / 2).cpu().to(F64), want_grads["w"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,dtype", [("torch", F64), ("triton", torch.float32)])
@pytest.mark.parametrize("name", ["la", "gcl", "lade"])
def test_probability_targets(backend, dtype, name):
    """Class-probability targets (mixup) with dp_group: 'mean' over the global N, LADE's class sums weighed by q."""
    gen = torch.Generator().manual_seed(17)
    N, C = 7, 9
    x = torch.randn(N, C, generator=gen, dtype=dtype)
    q = torch.softmax(torch.randn(N, C, generator=gen, dtype=dtype) * 2, 1)
    vec = class_vectors(C, gen)
    dp_fn, _ = _losses(name, {k: t.to(DEVICE) for k, t in vec.items()}, dtype, weight=vec["weight"],
                       label_smoothing=0.1, reduction="mean", backend=backend, sizes=[4, 3])
    _, ref_fn = _losses(name, vec, F64, weight=vec["weight"], label_smoothing=0.1, reduction="mean",
                        backend="torch", sizes=[4, 3])
    losses, grads, _ = _run([4, 3], dict(x=x.to(DEVICE), y=q.to(DEVICE)), dp_fn)
    want, want_grad = _reference(dict(x=x.to(F64), y=q.to(F64)), ref_fn)
    tol = 1e-12 if dtype == F64 else 1e-5
    for loss in losses:
        torch.testing.assert_close(loss.cpu().to(F64), want, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat(grads["x"]).cpu().to(F64) / 2, want_grad["x"], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_infinite_global_loss_stays_infinite(backend):
    """A row whose target logit is -inf: the loss is +inf in one process (as F.cross_entropy's); under dp_group the
    global loss came back NaN on every rank (the gradient scaling by the world size computed inf - inf)."""
    z = torch.randn(4, 5, dtype=torch.float32, device=DEVICE)
    z[1, 3] = -math.inf
    y = torch.tensor([0, 3, 2, 4], device=DEVICE)
    assert torch.isinf(LF.adjusted_cross_entropy(z, y, backend=backend))
    for reduction in ("mean", "sum"):
        losses, _, _ = _run([2, 2], dict(x=z, y=y), lambda g, x, y, r=reduction: LF.adjusted_cross_entropy(
            x, y, backend=backend, reduction=r, dp_group=g))
        assert all(bool(torch.isposinf(loss)) for loss in losses), (reduction, losses)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_half_precision_rank_sums_are_taken_in_fp32(backend):
    """Each rank's row sum is added over the ranks in fp32: it was the logits' dtype first, so 16 rows of a
    loss of 5000 (80000 > fp16's 65504) made the global fp16 mean NaN where one process (Triton) gives 5000."""
    z = torch.zeros(32, 4, dtype=torch.float16, device=DEVICE)
    z[:, 1] = 5000.0
    y = torch.zeros(32, dtype=torch.long, device=DEVICE)
    losses, grads, _ = _run([16, 16], dict(x=z, y=y), lambda g, x, y: LF.adjusted_cross_entropy(
        x, y, backend=backend, dp_group=g))
    for loss in losses:
        assert loss.dtype == torch.float16 and float(loss) == 5000.0, losses
    assert all(torch.isfinite(g).all() for g in grads["x"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_under_autocast_returns_the_dtype_of_one_process(backend):
    """A head under autocast (fp32 features, bf16 matmuls) returns its loss in float32, as nn.Linear and
    nn.CrossEntropyLoss do there; under dp_group too (it came back in the features' fp32 when one process gave the
    autocast dtype: the rank's bf16 sum widened after it was rounded)."""
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(8, 6, generator=gen).to(DEVICE)
    w = torch.randn(5, 6, generator=gen).to(DEVICE)
    y = torch.randint(0, 5, (8,), generator=gen).to(DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
        one = H.linear_cross_entropy(f, w, y, backend=backend)
        losses, _, _ = _run([5, 3], dict(x=f, y=y), lambda g, x, y: H.linear_cross_entropy(
            x, w, y, backend=backend, dp_group=g))
    assert one.dtype == torch.float32
    for loss in losses:
        assert loss.dtype == one.dtype
        torch.testing.assert_close(loss.float(), one.float(), rtol=2e-2, atol=2e-2)


def test_dp_group_world_needs_the_default_group_and_other_strings_are_refused():
    """dp_group='world' is looked up at the call: without init_process_group there is none (a clear error, not a
    silent per-rank loss); another string is refused by name."""
    import torch.distributed as dist

    import fastlt

    if dist.is_available() and dist.is_initialized():
        pytest.skip("a process group is up in this process")
    z, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    counts = [9, 5, 3, 2, 1]
    for crit in (fastlt.LADELoss(counts, dp_group="world", backend="torch"),
                 fastlt.LogitAdjustedLoss(counts, dp_group="world", backend="torch")):
        with pytest.raises(RuntimeError, match="init_process_group"):
            crit(z, y)
    with pytest.raises(ValueError, match="dp_group must be a process group, 'world'"):
        fastlt.LogitAdjustedLoss(counts, dp_group="wrold", backend="torch")(z, y)
    with pytest.raises(ValueError, match="dp_group must be a process group, 'world'"):
        H.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), y, dp_group="all")


def test_a_loss_module_refuses_a_shard_that_is_not_a_class_shard():
    """shard=(0, 5) raised AttributeError ('tuple' object has no attribute 'num_classes') from a module, where the
    functions and the heads say what a shard must be."""
    import fastlt

    crit = fastlt.LogitAdjustedLoss([5, 4, 3, 2, 1], shard=(0, 5), backend="torch")
    with pytest.raises(TypeError, match="shard must be a fastlt.distributed.ClassShard, got tuple"):
        crit(torch.randn(3, 5), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_lade_in_bfloat16_over_ranks_equals_one_process(reduction):
    """bf16 logits, LADE over 2 simulated ranks on the reference path: each rank's PriorCE sum was rounded to bf16
    before the ranks added them ('sum' of 64 rows: 364 where one process gives 362); now summed in
    float32, the global loss is one process's."""
    gen = torch.Generator().manual_seed(5 if reduction == "sum" else 7)  # (inputs where the two roundings differ)
    C = 9
    x = (3 * torch.randn(64, C, generator=gen)).bfloat16()
    y = torch.randint(0, C, (64,), generator=gen)
    pi = prior(torch.randint(1, 50, (C,), generator=gen))
    losses, _, _ = _run([32, 32], dict(x=x, y=y), lambda g, x, y: LF.lade_loss(
        x, y, pi, 0.2, 0.1, backend="torch", dp_group=g, reduction=reduction))
    want = R.lade_loss(x, y, pi, 0.2, 0.1, reduction=reduction)
    for loss in losses:
        assert loss.dtype == torch.bfloat16
        torch.testing.assert_close(loss, want, rtol=0, atol=0)
