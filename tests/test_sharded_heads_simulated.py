"""Class-parallel heads in one process (:class:`fastlt.distributed.SimulatedWorld`): each simulated rank holds the
weight rows of its classes; against the same head, unsharded, in one process on the concatenated batch (float64):
the loss, each rank's features' gradient (its rows; times W by default, for a DDP backbone), the weight and bias
slices' gradients. Also top-k over every class, the full weight gathered, the global gradient norm, the errors."""

import math

import pytest
import torch
from conftest import DEVICE, long_tail_counts

import fastlt
from fastlt.distributed import ClassShard, SimulatedWorld, clip_grad_norm_, gather_full_weight
from fastlt.heads import cosine_cross_entropy, lade_linear_loss, linear_cross_entropy

pytestmark = pytest.mark.distributed

F64 = torch.float64
D = 5


def _data(W, n, C, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(W * n, D, generator=gen, dtype=F64)
    y = torch.randint(0, C, (W * n,), generator=gen)
    y[1] = -100
    return x, y, long_tail_counts(C, gen), gen


def _make(kind, C, counts, shard=None, **kw):
    if kind == "gcl":
        return fastlt.CosineGCLHead(D, C, counts, m=0.2, s=8.0, noise_mul=0.5, gamma=1.0, shard=shard,
                                    dtype=F64, **kw)
    loss = {"la_weighted": "la", "ldam": "ldam", "lade": "lade", "ce_smooth": "ce"}[kind]
    extra = dict(weight_classes=torch.linspace(0.5, 1.5, C, dtype=F64)) if kind in ("la_weighted", "lade") else {}
    if kind == "ce_smooth":
        extra["label_smoothing"] = 0.1
    return fastlt.LinearLossHead(D, C, counts, loss=loss, shard=shard, dtype=F64, **extra, **kw)


def _call(head, x, y):
    return head(x, y, seed=11) if isinstance(head, fastlt.CosineGCLHead) else head(x, y)


@pytest.mark.parametrize("kind", ["la_weighted", "ldam", "ce_smooth", "gcl", "lade"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather_inputs", "replicated"])
def test_sharded_head_equals_one_process(kind, gather):
    """W = 3 ranks (C = 21: balanced 8/8/5), 4 rows each: the gathered batch's loss on every rank; the features'
    gradient W times the single-process rows' (the default scale), the weight and bias rows' gradients exact.
    Replicated features: each rank gets the whole batch's gradient."""
    W, n, C = 3, 4, 21
    x, y, counts, _ = _data(W, n, C)
    full = _make(kind, C, counts)
    xf = x.clone().requires_grad_()
    want = _call(full, xf, y)
    want.backward()
    world = SimulatedWorld(W)

    def rank_fn(group):
        shard = ClassShard.balanced(C, group)
        head = _make(kind, C, counts, shard=shard, gather_inputs=gather)
        with torch.no_grad():
            head.weight.copy_(full.weight[shard.start:shard.stop])
            if getattr(head, "bias", None) is not None:
                head.bias.copy_(full.bias[shard.start:shard.stop])
        rows = slice(group.rank * n, (group.rank + 1) * n) if gather else slice(None)
        xr = x[rows].clone().requires_grad_()
        loss = _call(head, xr, y[rows])
        loss.backward()
        return loss.detach(), xr.grad, head.weight.grad, getattr(getattr(head, "bias", None), "grad", None)

    out = world.run(rank_fn)
    for loss, *_ in out:
        torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    if gather:
        torch.testing.assert_close(torch.cat([o[1] for o in out]), W * xf.grad, rtol=1e-12, atol=1e-12)
    else:
        for o in out:
            torch.testing.assert_close(o[1], xf.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([o[2] for o in out]), full.weight.grad, rtol=1e-12, atol=1e-12)
    if getattr(full, "bias", None) is not None:
        torch.testing.assert_close(torch.cat([o[3] for o in out]), full.bias.grad, rtol=1e-12, atol=1e-12)


def test_functional_heads_scale_and_kernels():
    """features_grad_scale=1.0: the exact gradient of the gathered loss; an empty shard (C = 9 over 3: 8/1/0); the
    kernels (interpreter without a GPU) in fp32 against the float64 reference; the cosine and LADE functions."""
    W, n, C = 3, 3, 9
    x, y, counts, gen = _data(W, n, C, seed=1)
    w = torch.randn(C, D, generator=gen, dtype=F64)
    b = torch.randn(C, generator=gen, dtype=F64)
    lp = fastlt.priors.log_prior(counts).to(F64)
    pi = fastlt.priors.prior(counts).to(F64)
    cases = {
        "linear": (lambda f, ww, bb, t, **k: linear_cross_entropy(f, ww, t, bb, log_prior=lp, scale=2.0, **k)),
        "cosine": (lambda f, ww, bb, t, **k: cosine_cross_entropy(f, ww, t, log_prior=lp, scale=4.0, **k)),
        "lade": (lambda f, ww, bb, t, **k: lade_linear_loss(f, ww, t, pi, bb, **k)),
    }
    for name, fn in cases.items():
        xf, wf, bf = (t.clone().requires_grad_() for t in (x, w, b))
        want = fn(xf, wf, bf, y, backend="torch", dp_group=False) if name == "lade" else fn(xf, wf, bf, y,
                                                                                             backend="torch")
        want.backward()
        for backend, dtype in (("torch", F64), ("triton", torch.float32)):
            if name == "lade" and backend == "triton":
                continue
            dev = "cpu" if backend == "torch" else DEVICE

            def rank_fn(group, fn=fn, backend=backend, dtype=dtype, dev=dev):
                shard = ClassShard.balanced(C, group)
                xr = x[group.rank * n:(group.rank + 1) * n].to(dev, dtype).requires_grad_()
                wr = w[shard.start:shard.stop].to(dev, dtype).requires_grad_()
                br = b[shard.start:shard.stop].to(dev, dtype).requires_grad_()
                loss = fn(xr, wr, br, y[group.rank * n:(group.rank + 1) * n].to(dev), shard=shard, backend=backend,
                          features_grad_scale=1.0)
                loss.backward()
                return loss.detach().cpu(), xr.grad.cpu(), wr.grad.cpu(), br.grad
            out = SimulatedWorld(W).run(rank_fn)
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-5)
            for o in out:
                torch.testing.assert_close(o[0].to(F64), want.detach(), **tol, msg=f"{name} {backend}")
            torch.testing.assert_close(torch.cat([o[1] for o in out]).to(F64), xf.grad, **tol)
            torch.testing.assert_close(torch.cat([o[2] for o in out]).to(F64), wf.grad, **tol)


def test_topk_full_weight_and_grad_norm():
    """topk over every class equals the unsharded head's (gathered rows: each rank its own rows); the gathered
    weight and bias are the full ones (a state dict for the unsharded head); clip_grad_norm_ gives the norm of all
    the gradients, the same on every rank, and scales them as torch's."""
    W, n, C = 3, 4, 21
    x, y, counts, _ = _data(W, n, C, seed=2)
    full = _make("la_weighted", C, counts)
    want = full.topk(x, 4)
    backbone_grad = torch.randn(7, dtype=F64)
    world = SimulatedWorld(W)

    def rank_fn(group):
        shard = ClassShard.balanced(C, group)
        head = _make("la_weighted", C, counts, shard=shard)
        with torch.no_grad():
            head.weight.copy_(full.weight[shard.start:shard.stop])
            head.bias.copy_(full.bias[shard.start:shard.stop])
        top = head.topk(x[group.rank * n:(group.rank + 1) * n], 4)
        state = gather_full_weight(head)
        rep = torch.nn.Parameter(torch.zeros(7, dtype=F64))
        rep.grad = backbone_grad.clone()
        head.weight.grad = head.weight.detach().clone()
        head.bias.grad = head.bias.detach().clone()
        norm = clip_grad_norm_([rep], head.parameters(), 0.5, group)
        return top, state, norm, head.weight.grad.clone(), rep.grad.clone()

    out = world.run(rank_fn)
    torch.testing.assert_close(torch.cat([o[0].values for o in out]), want.values)
    assert torch.equal(torch.cat([o[0].indices for o in out]), want.indices)
    for o in out:
        torch.testing.assert_close(o[1]["weight"], full.weight.detach())
        torch.testing.assert_close(o[1]["bias"], full.bias.detach())
    total = torch.cat([backbone_grad, full.weight.detach().reshape(-1), full.bias.detach()]).norm()
    for o in out:
        torch.testing.assert_close(o[2], total.float(), rtol=1e-6, atol=0)
    coef = 0.5 / (total + 1e-6)
    torch.testing.assert_close(out[0][4], backbone_grad * coef, rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.cat([o[3] for o in out]), full.weight.detach() * coef, rtol=1e-6, atol=0)
    assert math.isfinite(float(out[0][2]))
    unsharded = _make("la_weighted", C, counts)
    unsharded.load_state_dict(out[1][1], strict=False)
    assert torch.equal(unsharded.weight, full.weight)


def test_errors():
    world = SimulatedWorld(2)
    counts = torch.arange(1, 12)

    def bad(group):
        shard = ClassShard.balanced(11, group)
        with pytest.raises(ValueError, match="weight holds the rows"):
            linear_cross_entropy(torch.zeros(2, D), torch.zeros(11, D), torch.zeros(2, dtype=torch.long), shard=shard)
        with pytest.raises(NotImplementedError, match="dp_group"):
            fastlt.LinearLossHead(D, 11, counts, shard=shard, dp_group=group)
        with pytest.raises(ValueError, match="describes 12 classes"):
            fastlt.LinearLossHead(D, 11, counts, shard=ClassShard(0, 8, 12, group))
        with pytest.raises(ValueError, match="chunk_rows"):
            linear_cross_entropy(torch.zeros(2, D), torch.zeros(shard.size, D), torch.zeros(2, dtype=torch.long),
                                 shard=shard, chunk_rows=4)
        with pytest.raises(TypeError, match="gather_inputs"):
            linear_cross_entropy(torch.zeros(2, D), torch.zeros(shard.size, D), torch.zeros(2, dtype=torch.long),
                                 shard=shard, gather_inputs="yes")
        with pytest.raises(NotImplementedError, match="reference path"):
            lade_linear_loss(torch.zeros(2, D), torch.zeros(shard.size, D), torch.zeros(2, dtype=torch.long),
                             torch.full((11,), 1 / 11), shard=shard, backend="triton")
        head = fastlt.LinearLossHead(D, 11, counts, shard=shard)
        assert head.weight.shape == (shard.size, D) and head.logits(torch.zeros(3, D)).shape == (3, shard.size)
        head.weight._fsdp_flattened = True  # what FSDP marks its flattened parameters with
        with pytest.raises(ValueError, match="FSDP"):
            head(torch.zeros(2, D), torch.zeros(2, dtype=torch.long))
        return 0

    world.run(bad)


@pytest.mark.parametrize("kind", ["la_weighted", "gcl"])
def test_ranks_seeded_alike_start_their_shards_with_other_rows(kind):
    """Ranks seeded alike (the usual DDP set-up) drew the same rows for every shard: class j and j + shard size
    started as one vector. Each shard now draws from a generator forked by its first class; the result is a function
    of the seed, and the ranks' generators stay in step after it."""
    C = 16
    counts = long_tail_counts(C, torch.Generator().manual_seed(0))

    def rank_fn(group):
        torch.manual_seed(3)
        head = _make(kind, C, counts, shard=ClassShard.balanced(C, group))
        return head.weight.detach().clone(), torch.rand(1)

    first, second = SimulatedWorld(2).run(rank_fn)
    assert first[0].shape == second[0].shape == (8, D)
    assert not torch.isclose(first[0], second[0]).any()
    torch.testing.assert_close(first[1], second[1], rtol=0, atol=0)
    torch.testing.assert_close(SimulatedWorld(2).run(rank_fn)[0][0], first[0], rtol=0, atol=0)
    bound = 1 / math.sqrt(D)
    assert first[0].abs().max() <= bound and first[0].std() > bound / 4  # still U(-1/sqrt(D), 1/sqrt(D))
