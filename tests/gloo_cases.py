"""The cases the real gloo ranks run (:mod:`gloo_pool`); each returns plain values or CPU tensors, which the tests
compare with one process on the concatenated batch. Inputs come from fixed seeds, so the test process rebuilds
them (:func:`batch`, :func:`model`)."""

from __future__ import annotations

import os
import warnings

import torch

if not torch.cuda.is_available():  # the kernels on the CPU run in Triton's interpreter (as in conftest)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import fastlt  # noqa: E402
from fastlt import functional as LF  # noqa: E402
from fastlt.noise import draw_seed  # noqa: E402

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel cases' tensors (gloo carries CUDA tensors too)
N, D, C = 8, 6, 11
SIZES = (5, 3)  # uneven per-rank batches
GCL_SEED = 7


def batch(seed: int = 0):
    """The global batch: features (N, D) float64, targets (N,) with two ignored rows, class counts, class
    weights."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen, dtype=F64)
    y = torch.randint(0, C, (N,), generator=gen)
    y[[1, 6]] = -100
    counts = torch.randint(1, 300, (C,), generator=gen)
    weight = (torch.rand(C, generator=gen) + 0.5).to(F64)  # exact in fp32 (the kernels take fp32 weights)
    return x, y, counts, weight


def model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(D, C).double()


def criteria(counts, weight, dp_group) -> dict:
    """The losses compared, by name: every module, with class weights, ignored rows, smoothing, 'mean' and 'sum'."""
    common = dict(backend="torch", dp_group=dp_group)
    return {
        "la_weighted_mean": fastlt.LogitAdjustedLoss(counts, tau=0.5, weight=weight, label_smoothing=0.1, **common),
        "balanced_softmax_sum": fastlt.BalancedSoftmaxLoss(counts, reduction="sum", **common),
        "ldam_weighted": fastlt.LDAMLoss(counts, s=5.0, weight=weight, **common),
        "gcl": fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0, rows_per_rank=max(SIZES), **common),
        "lade_weighted": fastlt.LADELoss(counts, weight=weight, label_smoothing=0.1, **common),
    }


def _rows():
    rank = dist.get_rank()
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def ddp_losses(group="process group") -> dict:
    """Every loss under ``DistributedDataParallel(nn.Linear)`` on uneven batches: the loss and the averaged
    parameter gradients; the losses' ``dp_group`` the default process group itself, or ``group='world'``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, y, counts, weight = batch()
    rows = _rows()
    out = {}
    for name, crit in criteria(counts, weight, dist.group.WORLD if group == "process group" else group).items():
        net = DDP(model())
        logits = net(x[rows])
        loss = crit(logits, y[rows], seed=GCL_SEED) if name == "gcl" else crit(logits, y[rows])
        loss.backward()
        out[name] = dict(loss=loss.detach(), weight=net.module.weight.grad, bias=net.module.bias.grad)
    return out


def ddp_losses_world() -> dict:
    """:func:`ddp_losses` with ``dp_group='world'`` (the default group, looked up at each call)."""
    return ddp_losses("world")


def gcl_noise_rows() -> dict:
    """GCL seeded alike on every rank (``torch.manual_seed(0)``, the usual DDP setup), equal batches of 4 zero
    logits: the per-row losses show the noise each rank drew."""
    counts = batch()[2]
    torch.manual_seed(0)
    crit = fastlt.GCLLoss(counts, m=0.0, s=1.0, noise_mul=1.0, reduction="none", backend="torch",
                          dp_group=dist.group.WORLD)
    return dict(rows=crit(torch.zeros(4, C, dtype=F64), torch.zeros(4, dtype=torch.long)))


def comm_counts() -> dict:
    """Collectives in the forward and the backward, counted by ``CommDebugMode``."""
    from torch.distributed.tensor.debug import CommDebugMode

    x, y, counts, weight = batch()
    rows = _rows()
    out = {}
    for name, crit in criteria(counts, weight, dist.group.WORLD).items():
        z = x[rows, :1].expand(-1, C).clone().requires_grad_()
        with CommDebugMode() as fwd:
            loss = crit(z, y[rows], seed=GCL_SEED) if name == "gcl" else crit(z, y[rows])
        with CommDebugMode() as bwd:
            loss.backward()
        out[name] = (fwd.get_total_counts(), bwd.get_total_counts(),
                     {str(k): v for k, v in fwd.get_comm_counts().items()})
    return out


def compiled() -> dict:
    """LADE and a weighted logit-adjusted mean with dp_group under ``torch.compile(fullgraph=True)`` (no graph
    break: functional collectives), against eager: the reference path in float64, the kernels in fp32."""
    x, y, counts, weight = batch()
    rows = _rows()
    group = dist.group.WORLD
    out = {}
    for backend, dtype, dev in (("torch", F64, "cpu"), ("triton", torch.float32, DEVICE)):
        pi = fastlt.priors.prior(counts).to(dev, dtype)
        w = weight.to(dev, dtype)
        t = y[rows].to(dev)

        def step(z, pi=pi, w=w, t=t, backend=backend):
            return (LF.lade_loss(z, t, pi, backend=backend, dp_group=group)
                    + LF.logit_adjusted_cross_entropy(z, t, torch.log(pi), weight=w, backend=backend,
                                                      dp_group=group))

        torch._dynamo.reset()
        fn = torch.compile(step, fullgraph=True, backend="aot_eager")
        for label, f in (("eager", step), ("compiled", fn)):
            z = x[rows].repeat(1, 2)[:, :C].to(dev, dtype).requires_grad_()
            loss = f(z)
            loss.backward()
            out[f"{backend} {label}"] = (loss.detach().cpu(), z.grad.cpu())
    return out


def warning() -> dict:
    """The one-time warning: LADE without dp_group under 2 ranks warns once; dp_group=False never."""
    from fastlt.distributed import data_parallel

    x, y, counts, weight = batch()
    pi = fastlt.priors.prior(counts).to(F64)
    data_parallel._WARNED = False
    with warnings.catch_warnings(record=True) as silent:
        warnings.simplefilter("always")
        LF.lade_loss(x[:, :1].expand(-1, C), y, pi, backend="torch", dp_group=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            LF.lade_loss(x[:, :1].expand(-1, C), y, pi, backend="torch")
            LF.logit_adjusted_cross_entropy(x[:, :1].expand(-1, C), y, torch.log(pi), weight=weight, backend="torch")
    return dict(silent=len(silent), messages=[str(w.message) for w in caught])


def sampler() -> dict:
    """ClassBalancedSampler without seed: rank 0's seed broadcast; the ranks' indices for epochs 0 and 1; the next
    GCL noise seed each rank's generator (seeded alike before) draws after it."""
    labels = torch.arange(40) % 7
    torch.manual_seed(11)
    s = fastlt.data.ClassBalancedSampler(labels, num_samples=21)
    after = draw_seed()
    first = list(s)
    s.set_epoch(1)
    return dict(seed=s.seed, len=len(s), epoch0=first, epoch1=list(s), after=after)


def kernels() -> dict:
    """The Triton path (the interpreter without a GPU; with one, CUDA tensors over gloo) with dp_group: a weighted
    logit-adjusted mean and LADE, fp32, tiny."""
    dev = DEVICE
    x, y, counts, weight = batch()
    rows = _rows()
    pi = fastlt.priors.prior(counts).to(dev)
    y = y[rows].to(dev)
    z = x[rows].float().repeat(1, 2)[:, :C].to(dev).requires_grad_()
    loss = (LF.logit_adjusted_cross_entropy(z, y, torch.log(pi), weight=weight.float().to(dev), backend="triton",
                                            dp_group=dist.group.WORLD)
            + LF.lade_loss(z, y, pi, backend="triton", dp_group=dist.group.WORLD))
    loss.backward()
    return dict(loss=loss.detach().cpu(), grad=z.grad.cpu())


def class_parallel() -> dict:
    """Class parallel on the 2 real ranks (balanced shards of C = 11: 8 and 3 classes): the full logits' loss and
    the local columns' gradient for every logits loss (float64 reference path, and the kernels in fp32), the
    collectives counted, and torch.compile(fullgraph=True) of the sharded loss."""
    from torch.distributed.tensor.debug import CommDebugMode

    from fastlt.distributed import ClassShard

    x, y, counts, weight = batch()
    z = x.repeat(1, 2)[:, :C]  # (8, 11) float64 logits, replicated; each rank keeps its columns
    shard = ClassShard.balanced(C, dist.group.WORLD)
    out = {"bounds": (shard.start, shard.stop)}
    crits = {
        "la_weighted": fastlt.LogitAdjustedLoss(counts, tau=0.5, weight=weight, label_smoothing=0.1, backend="torch",
                                                shard=shard),
        "ldam": fastlt.LDAMLoss(counts, s=5.0, backend="torch", shard=shard),
        "gcl": fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0, backend="torch", shard=shard),
        "lade": fastlt.LADELoss(counts, weight=weight, backend="torch", shard=shard),
    }
    for name, crit in crits.items():
        crit = crit.double()  # float64 class vectors, made again from the counts
        zl = z[:, shard.start:shard.stop].clone().requires_grad_()
        with CommDebugMode() as fwd:
            loss = crit(zl, y, seed=GCL_SEED) if name == "gcl" else crit(zl, y)
        with CommDebugMode() as bwd:
            loss.backward()
        out[name] = (loss.detach(), zl.grad, fwd.get_total_counts(), bwd.get_total_counts())
    zk = z[:, shard.start:shard.stop].float().to(DEVICE).requires_grad_()
    loss = LF.logit_adjusted_cross_entropy(zk, y.to(DEVICE), torch.log(fastlt.priors.prior(counts)).to(DEVICE),
                                           weight=weight.float().to(DEVICE), backend="triton", shard=shard)
    loss.backward()
    out["kernels"] = (loss.detach().cpu(), zk.grad.cpu())
    lp = torch.log(fastlt.priors.prior(counts)).to(F64)

    def step(zl):
        return LF.logit_adjusted_cross_entropy(zl, y, lp, weight=weight, backend="torch", shard=shard)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    zl = z[:, shard.start:shard.stop].clone().requires_grad_()
    c = compiled(zl)
    c.backward()
    out["compiled"] = (c.detach(), zl.grad)
    # a head shard on replicated features: the features' gradient summed over the ranks (shared_input)
    from fastlt.distributed import shared_input

    net = model()
    feats = x.clone().requires_grad_()
    w_local = net.weight[shard.start:shard.stop].detach().clone().requires_grad_()
    logits = torch.nn.functional.linear(shared_input(feats, dist.group.WORLD), w_local)
    LF.logit_adjusted_cross_entropy(logits, y, lp, backend="torch", shard=shard).backward()
    out["head"] = (feats.grad, w_local.grad)
    return out


def _column_shard(grad, mesh) -> torch.Tensor:
    """This rank's columns of a DTensor leaf's ``.grad``: the loss's backward gives Shard(1) (torch.autograd.grad
    does on every version), but torch 2.8 accumulated it into ``.grad`` as Replicate (2.13: Shard(1))."""
    from torch.distributed.tensor import Shard

    return grad.redistribute(mesh, [Shard(1)]).to_local()


def dtensor_and_gather() -> dict:
    """Class-sharded DTensor logits (torch.chunk's layout over a 1-D mesh: 6 and 5 of the 11 classes) into the loss
    modules and functions (float64 reference path; GCL's kernels in fp32 at the unaligned start 6), and
    ``combine='gather'`` (one all-gather, the same bits on both ranks)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    from fastlt.distributed import ClassShard

    x, y, counts, weight = batch()
    z = x.repeat(1, 2)[:, :C]
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    out = {}
    crits = {
        "la_weighted": fastlt.LogitAdjustedLoss(counts, tau=0.5, weight=weight, label_smoothing=0.1,
                                                backend="torch").double(),
        "gcl": fastlt.GCLLoss(counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0, backend="torch").double(),
        "lade": fastlt.LADELoss(counts, weight=weight, backend="torch").double(),
    }
    for name, crit in crits.items():
        zd = distribute_tensor(z.clone(), mesh, [Shard(1)]).requires_grad_()
        loss = crit(zd, y, seed=GCL_SEED) if name == "gcl" else crit(zd, y)
        loss.backward()
        out[name] = (loss.detach(), _column_shard(zd.grad, mesh))
    yd = distribute_tensor(y, mesh, [Replicate()])
    zk = distribute_tensor(z.float().clone(), mesh, [Shard(1)]).requires_grad_()
    loss = LF.gcl_cross_entropy(zk, yd, fastlt.priors.gcl_cloud(counts).float(), m=0.1, s=8.0, noise_mul=0.5,
                                seed=GCL_SEED, backend="triton")
    loss.backward()
    out["gcl_kernels"] = (loss.detach().cpu(), _column_shard(zk.grad, mesh).cpu())
    shard = ClassShard.balanced(C, dist.group.WORLD, combine="gather")
    lp = torch.log(fastlt.priors.prior(counts)).to(F64)
    for backend, dtype in (("torch", F64), ("triton", torch.float32)):
        zl = z[:, shard.start:shard.stop].to(dtype).clone().requires_grad_()
        loss = LF.logit_adjusted_cross_entropy(zl, y, lp.to(dtype), weight=weight.to(dtype), label_smoothing=0.1,
                                               backend=backend, shard=shard)
        loss.backward()
        out[f"gather_{backend}"] = (loss.detach(), zl.grad)
    return out


class _Net(nn.Module):
    """A backbone (DDP averages it) and a class-sharded cosine GCL head (DDP must leave it alone)."""

    def __init__(self, head):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(D, D).double()
        self.head = head

    def forward(self, x, y):
        return self.head(torch.tanh(self.backbone(x)), y, seed=GCL_SEED)


def gcl_head(counts, C_, shard=None):
    torch.manual_seed(1)
    return fastlt.CosineGCLHead(D, C_, counts, m=0.1, s=8.0, noise_mul=0.5, gamma=1.0, dtype=F64, shard=shard)


def sharded_head() -> dict:
    """A DDP backbone with a class-parallel cosine GCL head (balanced 8 + 3 of the 11 classes, 4 rows per rank,
    gather_inputs): the loss, DDP's averaged backbone gradient and each rank's head rows' gradient; DDP over the
    head's parameters without exclude_from_ddp raises in the forward (16 classes: 8 + 8, shapes DDP accepts)."""
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastlt.distributed import ClassShard, exclude_from_ddp

    x, y, counts, _ = batch()
    rank = dist.get_rank()
    rows = slice(4 * rank, 4 * rank + 4)
    shard = ClassShard.balanced(C, dist.group.WORLD)
    full = gcl_head(counts, C)
    head = gcl_head(counts, C, shard)
    with torch.no_grad():
        head.weight.copy_(full.weight[shard.start:shard.stop])
    net = _Net(head)
    ignored = exclude_from_ddp(net)
    model = DDP(net)
    with CommDebugMode() as fwd:
        loss = model(x[rows], y[rows])
    with warnings.catch_warnings(record=True) as caught:  # the features' gradient: a reduce-scatter
        warnings.simplefilter("always")
        loss.backward()
    out = dict(loss=loss.detach(), backbone=net.backbone.weight.grad, head=head.weight.grad, ignored=ignored,
               fwd=fwd.get_total_counts(), future=[str(w.message) for w in caught if w.category is FutureWarning])
    counts16 = torch.arange(1, 17)
    bad = DDP(_Net(gcl_head(counts16, 16, ClassShard.balanced(16, dist.group.WORLD))))
    try:
        bad(x[rows], y[rows].clamp(min=0))
        out["inside_ddp"] = None
    except ValueError as e:
        out["inside_ddp"] = str(e)
    return out


def readme_blocks() -> dict:
    """README.md's distributed examples as written (tests/readme_blocks.py), each rank on its own batch (the class
    parallel logits on the batch of rank 0, which the example replicates): the losses, the exported head weight and
    the replicated features' gradient."""
    import readme_blocks as RB
    from torch.nn.parallel import DistributedDataParallel

    from fastlt.distributed import ClassShard

    blocks, rank, group = RB.python_blocks(), dist.get_rank(), dist.group.WORLD
    out = {}
    ns = RB.namespace(batch_seed=rank)
    ns.update(group=group, batch_size=RB.N, epochs=2, ddp_model=DistributedDataParallel(ns["model"]))
    exec(blocks["data_parallel"], ns)
    out.update(data_parallel=ns["loss"].detach(), x=ns["x"], y=ns["y"])

    ns = RB.namespace(batch_seed=rank)
    torch.manual_seed(0)
    ns.update(group=group, backbone=nn.Linear(512, 512), x=ns["embeddings"], step=3,
              DistributedDataParallel=DistributedDataParallel)
    exec(blocks["class_parallel_head"], ns)
    out.update(class_parallel_head=ns["loss"].detach(), full_weight=ns["state"]["weight"])

    ns = RB.namespace(batch_seed=0)
    torch.manual_seed(0)
    w_init = torch.randn(RB.NUM_CLASSES, 512)
    features = ns["embeddings"].requires_grad_()
    ns.update(group=group, shard=ClassShard.balanced(RB.NUM_CLASSES, group), w_init=w_init, features=features)
    exec(blocks["class_parallel_logits"], ns)
    out.update(class_parallel_logits=ns["loss"].detach(), features_grad=features.grad)
    return out
