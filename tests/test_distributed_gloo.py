"""Data parallel in real processes: 2 gloo ranks on the CPU (spawned once for this file, :mod:`gloo_pool`), uneven
batches (5 and 3 rows), against one process on the concatenated batch of 8 rows (float64)."""

import math

import gloo_cases as G
import pytest
import torch
import torch.distributed as dist

import fastlt
from fastlt import functional as LF
from fastlt import reference as R
from fastlt.noise import draw_seed, gcl_noise
from fastlt.priors import gcl_cloud, prior

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]


@pytest.fixture(scope="module")
def pool():
    from gloo_pool import GlooPool

    p = GlooPool(2)
    yield p
    p.close()


def _single_process(name):
    """One process, the same module without dp_group, on all 8 rows: the loss and the parameters' gradients."""
    x, y, counts, weight = G.batch()
    crit = G.criteria(counts, weight, dp_group=False)[name]
    net = G.model()
    logits = net(x)
    loss = crit(logits, y, seed=G.GCL_SEED) if name == "gcl" else crit(logits, y)
    loss.backward()
    return loss.detach(), net.weight.grad, net.bias.grad


@pytest.mark.parametrize("name", ["la_weighted_mean", "balanced_softmax_sum", "ldam_weighted", "gcl", "lade_weighted"])
def test_ddp_gradients_equal_one_process_on_the_whole_batch(pool, name):
    """DistributedDataParallel(nn.Linear) + the loss with dp_group on 5 and 3 rows: every rank's loss and DDP's
    averaged gradients equal one process on the 8 rows, in float64."""
    results = getattr(pool, "_ddp", None) or pool.run("ddp_losses")
    pool._ddp = results
    loss, gw, gb = _single_process(name)
    for rank in results:
        got = rank[name]
        torch.testing.assert_close(got["loss"], loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["weight"], gw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got["bias"], gb, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["la_weighted_mean", "gcl", "lade_weighted"])
def test_dp_group_world_is_the_default_group(pool, name):
    """dp_group='world' (the default group, looked up at each call: dist.group.WORLD is None before
    init_process_group) gives what the group itself gives: one process on the 8 rows."""
    results = getattr(pool, "_ddp_world", None) or pool.run("ddp_losses_world")
    pool._ddp_world = results
    loss, gw, gb = _single_process(name)
    for rank in results:
        torch.testing.assert_close(rank[name]["loss"], loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rank[name]["weight"], gw, rtol=1e-12, atol=1e-12)


def test_ddp_without_dp_group_is_not_the_global_batch(pool):
    """The control: per-rank LADE (no dp_group), averaged by DDP, differs from the global batch's gradient, so the
    equality above is the collectives' doing."""
    x, y, counts, weight = G.batch()
    want = _single_process("lade_weighted")[1]
    grads = []
    for rows in (slice(0, 5), slice(5, 8)):
        net = G.model()
        G.criteria(counts, weight, dp_group=False)["lade_weighted"](net(x[rows]), y[rows]).backward()
        grads.append(net.weight.grad)
    assert (sum(grads) / 2 - want).abs().max() > 1e-3


def test_gcl_ranks_seeded_alike_draw_the_rows_of_one_process(pool):
    """torch.manual_seed(0) on both ranks: each rank's noise is its rows of one process's draw for that seed (rank
    r: rows 4r..4r+3), so the ranks' noise differs."""
    r0, r1 = (r["rows"] for r in pool.run("gcl_noise_rows"))
    torch.manual_seed(0)
    seed = draw_seed()
    cloud = gcl_cloud(G.batch()[2]).to(torch.float64)
    z = -(cloud * gcl_noise(seed, 8, G.C).to(torch.float64))
    want = torch.nn.functional.cross_entropy(z, torch.zeros(8, dtype=torch.long), reduction="none")
    torch.testing.assert_close(torch.cat([r0, r1]), want, rtol=1e-12, atol=1e-12)
    assert (r0 - r1).abs().min() > 0


def test_collective_counts(pool):
    """CommDebugMode: a cross-entropy's 'mean'/'sum' one all-reduce forward, LADE two (MAX and SUM), none in any
    backward."""
    for rank in pool.run("comm_counts"):
        for name, (fwd, bwd, kinds) in rank.items():
            assert fwd == (2 if name.startswith("lade") else 1), (name, kinds)
            assert bwd == 0, name
            assert all("all_reduce" in k or "allreduce" in k for k in kinds), kinds


def test_compiled_loss_equals_eager(pool):
    """torch.compile(fullgraph=True) traces the collectives (no graph break) and gives eager's loss and gradient."""
    for rank in pool.run("compiled"):
        for backend, tol in (("torch", 1e-12), ("triton", 1e-6)):
            (le, ge), (lc, gc) = rank[f"{backend} eager"], rank[f"{backend} compiled"]
            torch.testing.assert_close(lc, le, rtol=tol, atol=tol)
            torch.testing.assert_close(gc, ge, rtol=tol, atol=tol)


def test_one_time_warning_without_dp_group(pool):
    for rank in pool.run("warning"):
        assert rank["silent"] == 0
        assert len(rank["messages"]) == 1 and "dp_group" in rank["messages"][0], rank["messages"]


def test_sampler_shares_rank_zero_seed(pool):
    """No seed: rank 0's draw is broadcast; equal lengths, the ranks' interleaved indices are one seeded draw, a new
    one after set_epoch."""
    from fastlt.data import ClassBalancedSampler

    a, b = pool.run("sampler")
    assert a["seed"] == b["seed"] and a["len"] == b["len"] == 11
    # every rank drew (rank 0 only, before): generators seeded alike stay in step, so GCL's noise seeds agree
    assert a["after"] == b["after"]
    labels = torch.arange(40) % 7
    for epoch in (0, 1):
        one = ClassBalancedSampler(labels, num_samples=22, seed=a["seed"] + epoch)
        merged = [i for pair in zip(a[f"epoch{epoch}"], b[f"epoch{epoch}"], strict=True) for i in pair]
        assert merged == list(one)
    assert a["epoch0"] != a["epoch1"]


def test_kernel_path(pool):
    """The Triton path with dp_group in real processes: the loss and each rank's gradient / 2 against the float64
    reference on the 8 rows."""
    x, y, counts, weight = G.batch()
    pi = prior(counts)
    z = x.float().repeat(1, 2)[:, :G.C].double().requires_grad_()
    want = (R.logit_adjusted_cross_entropy(z, y, torch.log(pi).double(), weight=weight.float().double())
            + R.lade_loss(z, y, pi.double()))
    want.backward()
    ranks = pool.run("kernels")
    for rank in ranks:
        torch.testing.assert_close(rank["loss"].double(), want.detach(), rtol=1e-5, atol=1e-5)
    got = torch.cat([r["grad"] for r in ranks]).double() / 2
    torch.testing.assert_close(got, z.grad, rtol=1e-4, atol=1e-6)
    assert math.isfinite(float(LF.lade_loss(z.detach().float(), y, pi, backend="torch")))


def test_class_parallel_equals_the_full_logits(pool):
    """2 ranks holding 8 and 3 of the 11 classes: every loss returns the full logits' loss on both ranks and the
    reference gradient of each rank's columns (float64; the kernels in fp32); 2 all-reduces forward, 0 backward;
    torch.compile(fullgraph=True) traces it."""
    x, y, counts, weight = G.batch()
    z = x.repeat(1, 2)[:, :G.C]
    lp = torch.log(prior(counts)).to(torch.float64)
    refs = {  # the same modules in one process on the full logits, float64 class vectors
        "la_weighted": fastlt.LogitAdjustedLoss(counts, tau=0.5, weight=weight, label_smoothing=0.1).double(),
        "ldam": fastlt.LDAMLoss(counts, s=5.0).double(),
        "gcl": lambda t: fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0).double()(t, y,
                                                                                                  seed=G.GCL_SEED),
        "lade": fastlt.LADELoss(counts, weight=weight).double(),
    }
    ranks = pool.run("class_parallel")
    for name, ref in refs.items():
        z64 = z.clone().requires_grad_()
        want = ref(z64) if name == "gcl" else ref(z64, y)
        want.backward()
        grads = []
        for rank in ranks:
            loss, grad, fwd, bwd = rank[name]
            torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12, msg=name)
            assert (fwd, bwd) == (2, 0), name
            grads.append(grad)
        torch.testing.assert_close(torch.cat(grads, 1), z64.grad, rtol=1e-12, atol=1e-12)
    assert [r["bounds"] for r in ranks] == [(0, 8), (8, 11)]
    z32 = z.float().double().requires_grad_()
    want = R.logit_adjusted_cross_entropy(z32, y, lp.float().double(), weight=weight.float().double())
    want.backward()
    for rank in ranks:
        torch.testing.assert_close(rank["kernels"][0].double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rank["compiled"][0], ranks[0]["compiled"][0])
    torch.testing.assert_close(torch.cat([r["kernels"][1] for r in ranks], 1).double(), z32.grad, rtol=1e-4,
                               atol=1e-6)
    # the head shard on replicated features: both ranks get the full features' gradient, each its weight rows'
    net = G.model()
    feats = x.clone().requires_grad_()
    R.logit_adjusted_cross_entropy(torch.nn.functional.linear(feats, net.weight), y, lp).backward()
    for rank in ranks:
        torch.testing.assert_close(rank["head"][0], feats.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([r["head"][1] for r in ranks]), net.weight.grad, rtol=1e-12, atol=1e-12)


def test_dtensor_logits_and_gather_combine(pool):
    """DTensor logits sharded Shard(-1) on a 1-D mesh (torch.chunk's 6 + 5 classes) give the full logits' loss and
    gradient through the modules (LA, GCL, LADE) and the GCL kernels (an unaligned start: NOISE_SHIFT);
    combine='gather' gives it too, the same bits on both ranks."""
    x, y, counts, weight = G.batch()
    z = x.repeat(1, 2)[:, :G.C]
    lp = torch.log(prior(counts)).to(torch.float64)
    refs = {
        "la_weighted": fastlt.LogitAdjustedLoss(counts, tau=0.5, weight=weight, label_smoothing=0.1).double(),
        "gcl": lambda t, y: fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0).double()(
            t, y, seed=G.GCL_SEED),
        "lade": fastlt.LADELoss(counts, weight=weight).double(),
    }
    ranks = pool.run("dtensor_and_gather")
    for name, ref in refs.items():
        z64 = z.clone().requires_grad_()
        want = ref(z64, y)
        want.backward()
        for rank in ranks:
            torch.testing.assert_close(rank[name][0], want.detach(), rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks], 1), z64.grad, rtol=1e-12, atol=1e-12)
    z32 = z.float().double().requires_grad_()
    want = R.gcl_cross_entropy(z32, y, gcl_cloud(counts).float().double(), m=0.1, s=8.0, noise_mul=0.5,
                               seed=G.GCL_SEED)
    want.backward()
    for rank in ranks:
        torch.testing.assert_close(rank["gcl_kernels"][0].double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["gcl_kernels"][1] for r in ranks], 1).double(), z32.grad, rtol=1e-4,
                               atol=1e-6)
    for backend, tol in (("torch", 1e-12), ("triton", 2e-5)):
        zz = z.to(torch.float64 if backend == "torch" else torch.float32).double().clone().requires_grad_()
        want = R.logit_adjusted_cross_entropy(zz, y, lp, weight=weight, label_smoothing=0.1)
        want.backward()
        got = [r[f"gather_{backend}"] for r in ranks]
        assert torch.equal(got[0][0], got[1][0])
        torch.testing.assert_close(got[0][0].double(), want.detach(), rtol=tol, atol=tol)
        torch.testing.assert_close(torch.cat([g[1] for g in got], 1).double(), zz.grad, rtol=tol * 10, atol=tol)


def test_class_parallel_head_under_a_ddp_backbone(pool):
    """2 ranks, 4 rows each: a DDP backbone and a class-sharded cosine GCL head (8 + 3 classes, features and labels
    all-gathered) give one process's loss on the 8 rows, its backbone gradient (DDP's average of the ranks' W-scaled
    features' gradients) and its head gradient split by rows; 3 collectives forward (features, labels, and the
    loss's two all-reduces: CommDebugMode counts the all-gathers and all-reduces); DDP over the head raises."""
    x, y, counts, _ = G.batch()
    net = G._Net(G.gcl_head(counts, G.C))
    want = net(x, y)
    want.backward()
    ranks = pool.run("sharded_head")
    for rank in ranks:
        torch.testing.assert_close(rank["loss"], want.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rank["backbone"], net.backbone.weight.grad, rtol=1e-12, atol=1e-12)
        assert "head.weight" in rank["ignored"]
        assert rank["fwd"] == 4
        assert "exclude_from_ddp" in rank["inside_ddp"]
        assert rank["future"] == []  # (reduce_scatter_tensor, deprecated in torch 2.13)
    torch.testing.assert_close(torch.cat([r["head"] for r in ranks]), net.head.weight.grad, rtol=1e-12, atol=1e-12)


def test_readme_examples_on_two_ranks(pool):
    """README's data-parallel and class-parallel examples run as written on 2 ranks; each loss is the same on every
    rank and is the loss of the whole problem in one process (the data-parallel LADE of the concatenated batch,
    the class-parallel logits loss of the full weight); the exported weight is every rank's (C, 512)."""
    import readme_blocks as RB

    r0, r1 = pool.run("readme_blocks")
    ns = RB.namespace()
    for key in ("data_parallel", "class_parallel_head", "class_parallel_logits"):
        assert torch.isfinite(r0[key]), key
        torch.testing.assert_close(r0[key], r1[key], rtol=1e-6, atol=1e-6)
    whole = fastlt.LADELoss(ns["counts"])(ns["model"](torch.cat([r0["x"], r1["x"]])), torch.cat([r0["y"], r1["y"]]))
    torch.testing.assert_close(r0["data_parallel"], whole.detach(), rtol=1e-5, atol=1e-6)
    assert r0["full_weight"].shape == (RB.NUM_CLASSES, 512)
    torch.testing.assert_close(r0["full_weight"], r1["full_weight"])
    torch.manual_seed(0)
    w = torch.randn(RB.NUM_CLASSES, 512)
    feats = ns["embeddings"].requires_grad_()
    full = fastlt.LogitAdjustedLoss(ns["counts"], tau=1.0)(torch.nn.functional.linear(feats, w), ns["y"])
    full.backward()
    torch.testing.assert_close(r0["class_parallel_logits"], full.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r0["features_grad"], feats.grad, rtol=1e-5, atol=1e-6)
